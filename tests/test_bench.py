"""``clic bench``: every section is measured and reported on the tiny model (the values themselves are machine
numbers for BENCHMARKS.md, never asserted here)."""

import json

import pytest
import torch

from clic_lab import bench
from clic.cli import main


@pytest.fixture
def no_compile(monkeypatch):
    """torch.compile costs a minute and more on this CPU (tracing, inductor): here, where the bench's plumbing is
    under test, every section that would compile runs the same code uncompiled. That compiled learning, transfer
    and generation equal the eager ones is tested in test_learn.py, test_transfer.py and test_generate.py."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: fn)


def test_every_section(no_compile):
    r = bench.run_bench(bench.BenchOptions(model="micro", device="cpu", steps=2, warmup=1, reference=True,
                                           levers=True, sampling=True, sampling_steps=4, images=2, profile=True,
                                           sampling_compile="cudagraphs"))
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
    g = r["sampling_compiled"]
    assert g["compile_mode"] == "cudagraphs" and min(g["transfer_guided_s"], g["generate_2_s"]) > 0
    rows = r["profile"]["rows"]
    assert r["profile"]["step_ms"] > 0 and r["profile"]["device_busy_ms"] is None     # no GPU here
    assert 0 < len(rows) <= 15 and sum(row["share"] for row in rows) <= 1.0 + 1e-6
    assert rows == sorted(rows, key=lambda row: -row["self_ms_per_step"])

    # the markdown report carries the measured numbers into its tables
    text = bench.format_report(r)
    fast_row = next(line for line in text.splitlines() if line.startswith("| fast |"))
    assert f"{r['learning']['step_median_s']} s" in fast_row and f"{r['speedup_vs_reference']}x" in fast_row
    assert f"{s['generate_2_s']} s" in fast_row and "generation of 2" in text
    assert all(f"| {name} |" in text for name in r["levers"]) and f"`{rows[0]['op']}`" in text
    assert f"`--compile-unet --compile-mode cudagraphs`): transfer guided **{g['transfer_guided_s']} s**" in text


def test_report_of_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    assert main(["bench", "--report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clic: error: --report") and str(bad) in err and "\n" not in err
    bad.write_text('{"model": "tiny"}')                 # JSON, but not a bench result
    assert main(["bench", "--report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a `clic bench --json` result" in err and "\n" not in err


def test_meta_device_is_for_counts_of_a_built_kind(capsys, tmp_path):
    """--device meta has no values to time: anything but --flops / --tensor-memory, or a model folder, is refused in
    one line before a model is built."""
    for argv, culprit in ((["--model", "sdxl-random"], "--steps"),
                          (["--model", "sdxl-random", "--steps", "0", "--sampling"], "--sampling"),
                          (["--model", str(tmp_path), "--steps", "0", "--flops"], str(tmp_path))):
        assert main(["bench", "--device", "meta", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert culprit in err and "--device meta" in err and "\n" not in err


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--wall-steps", "4",
          "--json", str(out)])
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert json.loads(out.read_text()) == printed and printed["learning"]["steps"] == 3
    assert printed["learning_wall"]["steps"] == 4 and printed["learning_wall"]["wall_s"] > 0
    assert "bench: learning done" in captured.err and list(printed["sections_s"]) == ["model", "learning",
                                                                                       "learning_wall"]


def test_partial_results_and_reference_on_a_low_precision_backbone():
    """Every finished section is handed out at once (a run cut short keeps it), in the order most wanted first; a
    bf16 backbone times the reference path on the same modules cast to fp32, and gets its own dtype back."""
    seen = []
    r = bench.run_bench(bench.BenchOptions(model="tiny", device="cpu", dtype="bf16", steps=1, warmup=1,
                                           reference=True), on_update=lambda res: seen.append(list(res["sections_s"])))
    assert seen == [["model"], ["model", "learning"], ["model", "learning", "reference"]]
    assert r["reference"]["config"] == {"reference_path": True} and r["speedup_vs_reference"] > 0

    b = bench.load_bench_backbone("tiny", "cpu", "bf16")
    b32 = bench.as_dtype(b, "fp32")
    assert b32.dtype == torch.float32 and next(b.unet.parameters()).dtype == torch.float32
    assert bench.as_dtype(b32, "bf16").dtype == torch.bfloat16 and next(b.vae.parameters()).dtype == torch.bfloat16


def test_flop_count_of_a_learning_step():
    """The fast step is one UNet pass on the batch of 2 (context + RoI) forward and backward: between 2 and 3 times
    that forward pass counted on its own (backward: input gradients ~1x, weight gradients only for K/V), nothing
    else (the source latent is cached: VAE work only before the first step). The reference path re-encodes the
    image every step and computes every weight's gradient, so it counts more. Counts do not depend on the number
    of steps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clic_lab.bench import count_learning_flops, load_bench_backbone

    b = load_bench_backbone("micro", "cpu")
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
    from clic_lab.bench import TensorMemory, count_learning_memory, load_bench_backbone

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


def test_counts_on_the_meta_device_equal_the_cpus():
    """FLOPs and live-tensor bytes depend on shapes only: the model built on the meta device (no values, no memory:
    how the full-size SDXL step is counted) gives the counts the same model gives on the CPU: the learning step on
    the SDXL layout, the reference path on the SD layout (the smallest model: counting on the meta device is slow)."""
    from clic_lab.bench import count_learning_flops, count_learning_memory, load_bench_backbone

    for kind, cfg in (("micro", {"reference_path": True}), ("tiny-sdxl", {})):
        cpu, meta = load_bench_backbone(kind, "cpu"), load_bench_backbone(kind, "meta")
        assert {p.device.type for m in meta.modules for p in m.parameters()} == {"meta"}
        on_cpu, on_meta = count_learning_flops(cpu, **cfg), count_learning_flops(meta, **cfg)
        assert on_meta["step_gflop"] == on_cpu["step_gflop"] > 0
        assert on_meta["setup_gflop"] == on_cpu["setup_gflop"] and on_meta["by_op_gflop"] == on_cpu["by_op_gflop"]
    on_cpu, on_meta = count_learning_memory(cpu), count_learning_memory(meta)
    assert on_meta["weights_gib"] == on_cpu["weights_gib"] > 0
    assert on_meta["peak_gib"] == pytest.approx(on_cpu["peak_gib"], rel=0.02)
    assert on_meta["peak_gib"] > on_meta["weights_gib"]


def test_a_failing_section_is_recorded_and_the_rest_still_run(monkeypatch):
    """Out of memory in one section (or a compiler error in a lever) must not cost the sections after it."""
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "bench_sampling", oom)
    monkeypatch.setattr(bench, "LEVERS", {"fused-adam": {"adam_impl": "fused"}, "broken": {"no_such_option": 1}})
    logged = []
    r = bench.run_bench(bench.BenchOptions(model="tiny", device="cpu", steps=1, warmup=1, reference=True,
                                           sampling=True, levers=True), log=logged.append)
    failure = next(text for text in logged if text.startswith("bench: sampling failed:"))
    assert "Traceback" in failure and "in oom" in failure          # the log says where it failed
    assert r["sampling"] is None and r["errors"]["sampling"].startswith("RuntimeError: CUDA out of memory")
    assert r["reference"]["step_median_s"] > 0 and r["levers"]["fused-adam"]["step_median_s"] > 0
    assert r["levers"]["broken"] is None and "lever broken" in r["errors"]
    text = bench.format_report(r)
    assert "**sampling failed**" in text and "| broken | failed |" in text


def test_fastest_levers():
    """The combination run takes what paid, never the memory lever, and one compile (the faster)."""
    def timed(step):
        return {"step_median_s": step, "speedup_vs_fast": round(1.0 / step, 2)}

    levers = {"gradient-checkpointing": timed(0.5), "channels-last": timed(0.99), "fused-adam": None,
              "compile": timed(0.55), "compile-cudagraphs": timed(0.6),
              "combined": timed(0.1)}
    assert bench.fastest_levers(levers) == ["compile"]
    levers["compile"], levers["channels-last"] = None, timed(0.9)
    assert bench.fastest_levers(levers) == ["channels-last", "compile-cudagraphs"]
    assert bench.fastest_levers({"gradient-checkpointing": timed(0.5), "channels-last": timed(1.2)}) == []


def test_reference_path_gives_self_attention_its_processors_back():
    """The reference path computes self-attention with explicit softmax; later runs on the same model (the levers
    after the reference in one bench) must not inherit it."""
    from clic.config import learn_config as make_config

    b = bench.load_bench_backbone("tiny", "cpu")
    before = {n: type(p) for n, p in b.unet.attn_processors.items() if ".attn2." not in n}
    image, mask = bench._inputs(b.resolution)
    bench.learn_reference(b, [image], [mask], make_config(steps=1, object_class="chair", checkpoint_every=0),
                          progress=False)
    after = {n: type(p) for n, p in b.unet.attn_processors.items() if ".attn2." not in n}
    assert after == before and all(p.__name__ != "AttnProcessor" for p in after.values())


def test_profile_table_on_a_gpu():
    """On a GPU the table holds the kernels and copies (not the operators that launched them, which would count
    the same time twice) and says how much of the step the GPU was busy."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    def ev(key, device, self_device_us=0.0, cpu_total_us=0.0, count=2):
        return E(key=key, device_type=device, count=count, self_device_time_total=self_device_us,
                 self_cpu_time_total=0.0, cpu_time_total=cpu_total_us)

    events = [ev("ProfilerStep*", DeviceType.CPU, cpu_total_us=200_000),
              ev("aten::convolution", DeviceType.CPU, self_device_us=30_000),      # its kernel's time again
              ev("sm90_conv_kernel", DeviceType.CUDA, self_device_us=30_000),
              ev("Memcpy DtoH (Device -> Pageable)", DeviceType.CUDA, self_device_us=10_000)]
    table = bench.profile_table(events, steps=2, cuda=True)
    assert table["step_ms"] == 100.0 and table["device_busy_ms"] == 20.0
    assert [r["op"] for r in table["rows"]] == ["sm90_conv_kernel", "Memcpy DtoH (Device -> Pageable)"]
    assert [r["share"] for r in table["rows"]] == [0.75, 0.25] and table["rows"][0]["self_ms_per_step"] == 15.0
    text = bench.format_report({"model": "m", "device": "d", "dtype": "bf16", "resolution": 512, "torch": "t",
                                "date": "today", "profile": table})
    assert "100.0 ms wall, the GPU busy 20.0 ms of it (20%" in text and "| `sm90_conv_kernel` | 1.0 | 15.0 | 75.0% |" in text


def test_compile_counts_and_their_report_line():
    """What torch.compile did is counted (a graph break splits a function into two graphs), and a compiled lever's
    counts reach the report: on a GPU they tell whether CUDA graphs ran at all."""
    def split(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    before = bench.compile_counts()
    torch._dynamo.reset()
    torch.compile(split, backend="eager")(torch.ones(3))
    after = bench.compile_counts()
    assert after["graphs"] - before["graphs"] == 2 and after["graph_breaks"] - before["graph_breaks"] == 1

    row = {"step_median_s": 0.05, "speedup_vs_fast": 2.0, "first_step_extra_s": 90.0, "peak_memory_gib": 4.0,
           "compile": {"graphs": 2, "graph_breaks": 0, "cudagraph_skips": 1}}
    text = bench.format_report({"model": "m", "device": "d", "dtype": "bf16", "resolution": 512, "torch": "t",
                                "date": "today", "levers": {"compile-cudagraphs": row}})
    assert ("torch.compile in `compile-cudagraphs`: 2 graphs compiled, 0 graph breaks, "
            "CUDA graphs skipped for 1.") in text


def test_op_count_is_set_by_the_architecture(monkeypatch):
    """The operators of a learning step depend on the model's layers, not on their width (so a narrow model counts
    the host's work of a wide one); views and allocations are not counted as device work."""
    from clic.builder import SPECS

    tiny = bench.count_learning_ops(bench.load_bench_backbone("micro"))
    spec = SPECS["micro"]
    monkeypatch.setitem(SPECS, "micro-wide", {**spec, "unet": {**spec["unet"], "block_out_channels": (64,)}})
    wide = bench.count_learning_ops(bench.load_bench_backbone("micro-wide"))
    assert wide["ops_per_step"] == tiny["ops_per_step"] and wide["kernel_ops_per_step"] == tiny["kernel_ops_per_step"]
    assert 0 < tiny["kernel_ops_per_step"] < tiny["ops_per_step"]
    assert "convolution" in tiny["top_kernel_ops"] and "view" not in tiny["top_kernel_ops"]


@pytest.mark.parametrize("sync_every", [1, 3])
def test_step_times_of_a_loop_that_reads_its_losses_in_bursts(monkeypatch, sync_every):
    """With --sync-every N the loop reports N steps at a time; each step of a burst gets the burst's mean time. A
    clock that advances 2 s per step started gives a median of 2 s however the steps are reported."""
    import clic.learn

    started = [0]
    monkeypatch.setattr(clic.learn, "mark_step", lambda cfg: started.__setitem__(0, started[0] + 1))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: 2.0 * started[0])
    backbone = bench.load_bench_backbone("tiny", "cpu")
    r = bench.bench_learning(backbone, steps=6, warmup=1, sync_every=sync_every)
    assert r["sync_every"] == sync_every and r["steps"] == 7
    assert r["step_median_s"] == 2.0 and r["first_step_extra_s"] == 0.0 and r["wall_s"] == 14.0


def test_transfer_op_count_and_the_text_kv_cache():
    """A guided step (guidance forward and backward, then the CFG pass) launches more than an unguided one, and the
    text K/V cache saves each cross-attention layer's projections in every forward pass."""
    backbone = bench.load_bench_backbone("micro")
    cached, plain = bench.count_transfer_ops(backbone), bench.count_transfer_ops(backbone, kv_cache=False)
    n_layers = sum(".attn2." in name for name in backbone.unet.attn_processors)
    for kind, passes in (("guided_step", 2), ("unguided_step", 1)):
        # per pass and layer: the K and V projections (fp32 model: no casts), each a matmul and a bias add or one addmm
        saved = plain[kind]["kernel_ops"] - cached[kind]["kernel_ops"]
        assert saved > 0 and saved % (passes * n_layers) == 0, (kind, saved)
    assert cached["guided_step"]["kernel_ops"] > 2 * cached["unguided_step"]["kernel_ops"]
    text = bench.format_report({"model": "m", "device": "d", "dtype": "fp32", "resolution": 64, "torch": "t",
                                "date": "today", "transfer_ops": cached})
    g, u = cached["guided_step"]["kernel_ops"], cached["unguided_step"]["kernel_ops"]
    assert f"guided **{g}**, unguided **{u}**" in text
