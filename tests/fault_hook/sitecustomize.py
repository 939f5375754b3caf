"""Python imports this at start-up when tests/fault_hook is on PYTHONPATH (tests/conftest.py puts
it there): every process a test starts installs the environment's fault hook before dpm runs."""

import os

if os.environ.get("DPM_FAULT_AT") or os.environ.get("DPM_FAULT_SLEEP_S"):
    from dpm_env_faults import install_from_env

    install_from_env()
