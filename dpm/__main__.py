"""`python -m dpm`: with no arguments the quickstart comparison (dpm/quickstart.py); with
Hydra overrides one run or a multirun (dpm/run.py)."""
import sys

if len(sys.argv) == 1:
    from dpm.quickstart import main

    main()
else:
    from dpm.run import main

    main()
