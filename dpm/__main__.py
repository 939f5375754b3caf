"""`python -m dpm [overrides]`: the main job, one run or a sweep (dpm/cli.py)."""

from dpm.cli import main

main()
