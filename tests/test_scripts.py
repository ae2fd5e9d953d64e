"""The shell scripts parse (bash -n); the GPU ones cannot run in CI, so a syntax slip would surface only on the
GPU machine, where every minute counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_device_scripts_are_there():
    assert {"device_bench.sh", "device_bench_sdxl.sh", "device_env.sh", "device_toymodel.sh",
            "device_wheels.sh"} <= {p.name for p in SCRIPTS}


def test_sdxl_gpu_bench_runs_dry_on_the_cpu(tmp_path):
    """The SDXL GPU benchmark end to end with ``--dry`` (tiny-sdxl on the CPU, a few steps): every section it
    measures on the GPU is measured, and the report for BENCHMARKS.md is written."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "device_bench_sdxl.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(script), "--dry"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["model"] == "tiny-sdxl" and result["resolution"] == 64 and "errors" not in result
    assert result["learning"]["steps"] == 3 and result["learning_wall"]["steps"] == 3
    assert result["sampling"]["steps"] == 4 and result["sampling"]["transfer_guided_s"] > 0
    report = (tmp_path / "bench.md").read_text()
    assert "Measured: 3 learning steps in one run" in report and "transfer (guided)" in report
