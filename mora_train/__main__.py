"""`python -m mora_train` (also what `accelerate launch -m mora_train` runs)."""

from mora_train.cli import main

if __name__ == "__main__":
    main()
