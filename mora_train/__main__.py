"""`python -m mora_train` (also what `accelerate launch -m mora_train` runs)."""

from mora_train.cli.train import main

if __name__ == "__main__":
    main()
