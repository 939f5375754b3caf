"""`python -m dpm [overrides]`: with no arguments, the quickstart (see dpm/run.py)."""
from dpm.run import main

main()
