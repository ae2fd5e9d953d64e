"""The shell scripts parse (bash -n); the GPU ones cannot run in CI, so a syntax slip would surface only on the
GPU machine, where every minute counts."""

import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_device_scripts_are_there():
    assert {"device_bench.sh", "device_env.sh", "device_toymodel.sh", "device_wheels.sh"} <= {p.name for p in SCRIPTS}
