"""``clic bench``: every section is measured and reported on the tiny model (the values themselves are machine
numbers for BENCHMARKS.md, never asserted here)."""

import json

import pytest

from clic import bench
from clic.cli import main


@pytest.fixture
def no_compile(monkeypatch):
    """torch.compile costs minutes on this CPU; its equality is tested in test_learn.py."""
    monkeypatch.setattr(bench, "LEVERS", {k: v for k, v in bench.LEVERS.items() if k != "compile"})


def test_every_section(no_compile):
    r = bench.run_bench(bench.BenchOptions(model="tiny", device="cpu", steps=2, warmup=1, reference=True,
                                           levers=True, sampling=True, sampling_steps=4, images=2, profile=True))
    assert r["resolution"] == 64 and "CPU" in r["device"]
    for section in [r["learning"], r["reference"], *r["levers"].values()]:
        assert section["step_median_s"] > 0 and section["wall_s"] > 0 and section["steps"] == 3
        assert section["peak_memory_gib"] > 0
    assert set(r["levers"]) >= {"gradient-checkpointing", "channels-last", "fused-adam"}
    assert r["reference"]["config"] == {"reference_path": True}
    assert r["speedup_vs_reference"] == pytest.approx(
        r["reference"]["step_median_s"] / r["learning"]["step_median_s"], rel=0.02)
    s = r["sampling"]
    assert s["images"] == 2 and min(s["transfer_guided_s"], s["transfer_unguided_s"], s["generate_2_s"]) > 0
    rows = r["profile"]
    assert 0 < len(rows) <= 15 and sum(row["share"] for row in rows) <= 1.0 + 1e-6
    assert rows == sorted(rows, key=lambda row: -row["self_ms_per_step"])


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and printed["learning"]["steps"] == 3
