"""The shipped Hydra configs (package data): the defaults list in config.yaml and one folder per config group.

Hydra finds them as `pkg://mora_train.configs`, so they work from a wheel install in any directory.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
