"""``clic bench``: every section is measured and reported on the tiny model (the values themselves are machine
numbers for BENCHMARKS.md, never asserted here)."""

import json

import pytest
import torch

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


def test_flop_count_of_a_learning_step():
    """The fast step is one UNet pass on the batch of 2 (context + RoI) forward and backward: between 2 and 3 times
    that forward pass counted on its own (backward: input gradients ~1x, weight gradients only for K/V), nothing
    else (the source latent is cached: VAE work only before the first step). The reference path re-encodes the
    image every step and computes every weight's gradient, so it counts more. Counts do not depend on the number
    of steps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clic.bench import count_learning_flops, load_bench_backbone

    b = load_bench_backbone("tiny", "cpu")
    fast = count_learning_flops(b, steps=2)
    assert count_learning_flops(b, steps=3)["step_gflop"] == fast["step_gflop"]
    reference = count_learning_flops(b, steps=2, reference_path=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, b.unet.config.in_channels, b.latent_size, b.latent_size, generator=g)
    text = torch.randn(2, 77, b.unet.config.cross_attention_dim, generator=g)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        b.unet(x, torch.tensor([500, 500]), text)
    unet_forward = counter.get_total_flops() / 1e9
    assert 2.0 * unet_forward <= fast["step_gflop"] <= 3.0 * unet_forward
    assert fast["setup_gflop"] > 0 and reference["step_gflop"] > fast["step_gflop"] + fast["setup_gflop"] * 0.5
    assert fast["floor_500_steps_s"] == pytest.approx(500 * fast["step_gflop"] / 400e3, rel=1e-2, abs=1e-3)
    assert sum(fast["by_op_gflop"].values()) == pytest.approx(fast["step_gflop"], rel=1e-2)


def test_tensor_memory_counts_live_storages():
    """Hand-counted: views add nothing, freed tensors leave, tensors kept only by autograd for backward stay until
    backward has run; the peak includes what lived before (``base``)."""
    from clic.bench import TensorMemory, count_learning_memory, load_bench_backbone

    mb4 = 1000 * 1000 * 4
    x = torch.randn(1000, 1000, requires_grad=True)
    with TensorMemory(base=123) as m:
        a = torch.zeros(1000, 1000)
        view = a[10:]
        assert m.current == 123 + mb4 and view.untyped_storage().nbytes() == mb4
        c = a + 1
        assert m.current == 123 + 2 * mb4
        del c, a, view
        assert m.current == 123
        y = (x * 2).sin()                     # x * 2 has no Python reference: autograd keeps it for sin's backward
        assert m.current == 123 + 2 * mb4
        y.sum().backward()
        del y
        assert m.current == 123 + mb4         # x.grad
    assert m.peak >= 123 + 3 * mb4

    b = load_bench_backbone("tiny", "cpu")
    plain, ckpt = count_learning_memory(b), count_learning_memory(b, gradient_checkpointing=True)
    assert plain["weights_gib"] == ckpt["weights_gib"] > 0
    assert plain["peak_gib"] > ckpt["peak_gib"] > plain["weights_gib"]   # checkpointing keeps fewer activations
