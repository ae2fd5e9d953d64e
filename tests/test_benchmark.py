"""``clic benchmark``: outputs, cache hits, 2-process sharding equal to 1 process, bad manifests refused up front."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clic_lab import compare as benchmark
from clic.cli import main


def _write_case(folder, name, seed, box):
    rng = np.random.default_rng(seed)
    image = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).resize((64, 64), Image.BICUBIC).save(folder / f"{name}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[box[0]:box[1], box[2]:box[3]] = 255
    Image.fromarray(mask).save(folder / f"{name}_mask.png")


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("bench")
    for name, seed, box in (("chair", 0, (8, 30, 20, 50)), ("stool", 1, (30, 56, 10, 40)),
                            ("vase", 2, (10, 40, 10, 40)), ("cup", 3, (20, 50, 24, 60))):
        _write_case(folder, name, seed, box)
    manifest = {
        "name": "tiny", "model": tiny_model_dir,
        "learn": {"steps": 2, "checkpoint_every": 0},
        "transfer": {"steps": 3, "t_start": 1},
        "cases": [
            {"id": "chair", "source": "chair.png", "source_mask": "chair_mask.png", "target": "stool.png",
             "target_mask": "stool_mask.png", "object_class": "chair", "prompt": "a chair with <v*> style"},
            {"id": "vase", "source": "vase.png", "source_mask": "vase_mask.png", "target": "cup.png",
             "target_mask": "cup_mask.png", "object_class": "vase"},
        ],
        "methods": ["clic", "custom-diffusion"],
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return folder


@pytest.fixture(scope="module")
def one_process_run(manifest_dir, tmp_path_factory):
    """The reference run in this process, with 1 torch thread (as each sharded process below)."""
    out = tmp_path_factory.mktemp("out1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = benchmark.run_benchmark(manifest_dir / "manifest.yaml", out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, report, report.results_csv.read_text()


def test_outputs_csv_table_and_grid(one_process_run):
    out, report, csv_text = one_process_run
    lines = csv_text.splitlines()
    assert lines[0] == "case,method,base,seed,psnr,ssim,lpips,fidelity,attn_iou,attn_mass"
    assert [tuple(line.split(",")[:4]) for line in lines[1:]] == [
        ("chair", "clic", "clic", "0"), ("chair", "custom-diffusion", "custom-diffusion", "0"),
        ("vase", "clic", "clic", "0"), ("vase", "custom-diffusion", "custom-diffusion", "0")]
    for line in lines[1:]:
        psnr, ssim, lpips, fidelity, iou, mass = line.split(",")[4:]
        # the pixel composite keeps everything outside the mask: PSNR inf, SSIM 1 (windows off the mask)
        assert (psnr, ssim, lpips, fidelity) == ("inf", "1", "", "")
        assert 0 <= float(iou) <= 1 and 0 < float(mass) < 1
    costs = report.costs_csv.read_text().splitlines()
    assert len(costs) == 5 and all(float(c.split(",")[2]) > 0 for c in costs[1:])
    table = report.table.read_text()
    assert "| clic | 2 |" in table and "| custom-diffusion | 2 |" in table
    assert "fidelity skipped" in table and "LPIPS skipped" in table
    grid = Image.open(report.grid)
    assert grid.size == (4 * 128, 2 * (128 + 14))                     # rows: cases; source, target, 2 methods
    assert (out / "grids" / "chair.png").exists() and (out / "grids" / "vase.png").exists()
    assert report.missing == []


def test_rerun_hits_the_cache_and_only_new_work_runs(one_process_run, manifest_dir, monkeypatch, tmp_path):
    import shutil

    import clic.baselines

    out = tmp_path / "rerun"
    shutil.copytree(one_process_run[0], out)
    before = one_process_run[2]
    calls = {"learn": 0, "transfer": 0}
    learn, transfer = clic.baselines.learn_concept, clic.baselines.transfer_concept

    def count(kind, fn):
        def wrapped(*args, **kw):
            calls[kind] += 1
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(clic.baselines, "learn_concept", count("learn", learn))
    monkeypatch.setattr(clic.baselines, "transfer_concept", count("transfer", transfer))
    again = benchmark.run_benchmark(manifest_dir / "manifest.yaml", out, progress=False)
    assert calls == {"learn": 0, "transfer": 0}
    assert again.results_csv.read_text() == before

    # an eta sweep shares CLiC's concepts: only its transfers run
    data = yaml.safe_load((manifest_dir / "manifest.yaml").read_text())
    data["ablations"] = {"eta": [0]}
    (manifest_dir / "sweep.yaml").write_text(yaml.safe_dump(data))
    swept = benchmark.run_benchmark(manifest_dir / "sweep.yaml", out, progress=False)
    assert calls == {"learn": 0, "transfer": 2}
    rows = swept.results_csv.read_text().splitlines()
    assert len(rows) == 7 and sum(",clic-eta=0,clic," in r for r in rows) == 2
    assert rows[:3] == before.splitlines()[:3]

    # a metric plugged in later scores the cached results (merge only: nothing runs)
    monkeypatch.setitem(benchmark.METRIC_GROUPS, "redness", None)      # removed again after the test
    benchmark.register_metric("redness", ("red",), lambda s: {"red": float(s.result[0][s.target_mask[0] > 0].mean())})
    data["metrics"] = ["psnr", "redness"]
    (manifest_dir / "plugged.yaml").write_text(yaml.safe_dump(data))
    plugged = benchmark.run_benchmark(manifest_dir / "plugged.yaml", out, progress=False, merge_only=True)
    assert calls == {"learn": 0, "transfer": 2}
    lines = plugged.results_csv.read_text().splitlines()
    assert lines[0] == "case,method,base,seed,psnr,ssim,red" and -1 <= float(lines[1].split(",")[-1]) <= 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_csv(one_process_run, manifest_dir, tmp_path):
    out2 = tmp_path / "out2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "clic", "benchmark", str(manifest_dir / "manifest.yaml"), "--out", str(out2), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out2 / "results.csv").read_text() == one_process_run[2]
    processes = {line.split(",")[0]: line.split(",")[-1] for line in (out2 / "costs.csv").read_text().splitlines()[1:]}
    assert processes == {"chair": "0", "vase": "1"}                       # case i went to process i % 2
    assert json.loads((out2 / "shards" / "process1.json").read_text()) == {"failures": []}


def _bad(folder, name, **changes):
    data = yaml.safe_load((folder / "manifest.yaml").read_text())
    for key, value in changes.items():
        if key == "case0":
            data["cases"][0].update(value)
        else:
            data[key] = value
    path = folder / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def test_bad_manifests_fail_before_any_training(manifest_dir, tmp_path, monkeypatch, capsys):
    import clic.baselines

    def no_training(*args, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(clic.baselines, "learn_concept", no_training)
    cases = [
        (dict(case0={"source": "nowhere.png"}), "nowhere.png: file not found"),
        (dict(methods=["clic", "dreambooth"]), "unknown method 'dreambooth'"),
        (dict(case0={"id": "vase"}), "case 'vase': duplicate id"),
        (dict(methods=["clic", {"name": "x", "method": "clic", "learn": {"alpha": 3}}]), "--alpha must be in [0, 1]"),
        (dict(metrics=["psnr", "fid"]), "unknown metric 'fid'"),
        (dict(transfer={"etaa": 1.0}), "transfer: 'etaa' is not an option of any method's transfer config"),
    ]
    for k, (changes, message) in enumerate(cases):
        path = _bad(manifest_dir, f"bad{k}.json" if k % 2 else f"bad{k}.yaml", **changes)
        with pytest.raises(benchmark.BenchmarkError, match="nothing was run") as err:
            benchmark.run_benchmark(path, tmp_path / f"o{k}", progress=False)
        assert message in str(err.value)
        assert not (tmp_path / f"o{k}").exists()
    # all problems at once, one line from the CLI, exit code 2
    path = _bad(manifest_dir, "bad_all.yaml", case0={"source": "nowhere.png", "id": "vase"}, methods=["dreambooth"])
    assert main(["benchmark", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 problem(s)" in err and "duplicate id" in err and "dreambooth" in err


def test_mean_and_95_percent_interval():
    mean, lo, hi = benchmark.mean_ci([1.0, 2.0, 3.0])                  # sd 1, t(2 dof) = 4.3027
    assert mean == 2.0 and hi - mean == pytest.approx(4.302652729749462 / 3**0.5) and \
        mean - lo == pytest.approx(hi - mean)
    assert benchmark.mean_ci([5.0]) == (5.0, 5.0, 5.0)
    assert benchmark.mean_ci([None, float("nan")]) is None
