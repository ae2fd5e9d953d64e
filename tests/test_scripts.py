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


def test_toymodel_cpu_install_swaps_only_a_measured_run(tmp_path):
    """``toymodel_cpu.sh --install RUN`` refuses a run without its measurement and leaves the bundled model as it
    was; a measured run replaces it whole (pipeline, evaluation, grids)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "toymodel_cpu.sh"
    bundled = tmp_path / "toymodel"
    bundled.mkdir()
    (bundled / "model_index.json").write_text("old")
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (run / "pipeline" / "model_index.json").write_text("new")
    env = {**os.environ, "TOY_BUNDLED": str(bundled)}
    done = subprocess.run(["bash", str(script), "--install", str(run)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "no measured pipeline" in done.stderr
    assert (bundled / "model_index.json").read_text() == "old"
    (run / "eval").mkdir()
    for name in ("eval.json", "samples.png", "loss.png", "eval/eval_sheet.png"):
        (run / name).write_text(name)
    done = subprocess.run(["bash", str(script), "--install", str(run)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (bundled / "model_index.json").read_text() == "new"
    assert sorted(p.name for p in bundled.iterdir()) == ["eval.json", "eval_sheet.png", "loss.png", "model_index.json",
                                                        "samples.png"]
    assert not any(p.name.startswith("toymodel.") for p in tmp_path.iterdir())      # no staging left behind
