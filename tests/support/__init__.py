"""Test-only helpers: fault injection (faults.py) and the subprocess plugin that loads it (plugin/)."""
