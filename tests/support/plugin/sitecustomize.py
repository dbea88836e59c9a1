"""Loaded by Python at startup when this folder is on PYTHONPATH (tests.support.faults.fault_env):
installs the test fault named by MORA_TEST_FAULT into this process. Test code only."""

import os

if os.environ.get("MORA_TEST_FAULT"):
    from tests.support.faults import ENV_VAR, install

    install(os.environ[ENV_VAR])
