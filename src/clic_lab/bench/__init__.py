"""The speed bench (``clic bench``): speed and memory of learning, transfer and generation (the numbers of
BENCHMARKS.md). Timing here; counting in :mod:`.counting`, the reference path in :mod:`.reference`, the markdown
tables in :mod:`.report`.

Measures, as one JSON-able dict (:func:`run_bench`):

- learning: median step time after warm-up, its 500-step extrapolation and the measured wall time, peak memory
  (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS of the process), with the defaults (the fast path: on a
  GPU with CUDA graphs, ``--cuda-graphs auto``);
- ``--reference``: the same for the reference path (the official code's computation: explicit softmax in every
  attention layer, fp32, no caching of latents or text, context and RoI as separate UNet passes, gradients for the
  whole UNet) and the speed-up;
- ``--levers``: the fast path with each speed/memory lever on alone (eager, i.e. without CUDA graphs; gradient
  checkpointing, channels-last, fused Adam, torch.compile with its compile time) and with all that paid together;
- ``--sampling``: transfer (``--sampling-steps`` DDIM steps from t = 0, the first 30 with attention guidance), the
  same transfer unguided, and two-stage generation of ``--images`` images in one batch;
- ``--profile``: a torch.profiler table of a few eager learning steps (kernels or operators by self time: where the
  time goes), and on a GPU the wall and busy time of a step with CUDA graphs;
- ``--flops``: the floating-point operations of one learning step, fast and reference path (counted by
  ``torch.utils.flop_counter`` with attention in its math form, i.e. the algorithm's FLOPs, not a kernel's), by
  operator, and the floor they put on 500 steps at a given throughput (``--tflops``, default 400 TFLOP/s: a
  well-fed H100 in bf16). Exact on any device: ``clic bench --model sd14-random --device cpu --flops --steps 1``
  needs no GPU;
- ``--tensor-memory``: the peak bytes of live tensors during learning (weights, activations, gradients, optimizer
  state), counted op by op: what ``torch.cuda.max_memory_allocated`` reports, less the CUDA allocator's rounding and
  kernel workspaces, so an estimate of the GPU peak from any device. Fast path and with gradient checkpointing.

- ``--ops``: the operators one learning step dispatches, and those of them that launch device work: the kernels an
  eager step's host launches one by one (exact on any device; the model's architecture sets it, not its width);
- ``--sampling-compile MODE``: ``--sampling`` again with the UNet compiled (``--compile-unet --compile-mode MODE``);
- ``--wall-steps N``: one learning run of N steps timed end to end (the 500-step goal measured, not extrapolated);
- ``--report bench.json``: measure nothing, print a result's markdown tables (BENCHMARKS.md's layout).

Sections run most-wanted first and ``on_update`` gets the result after each (``--json`` rewrites the file), so a
run cut short keeps what it measured.
Speed does not depend on weight values, so ``--model sd14-random`` builds the SD1.4 architecture in memory
(nothing written to disk). ``--all`` is everything, the command for a GPU machine (``scripts/device_bench.sh``
runs it on a GPU machine without network access)::

    clic bench --model sd14-random --device cuda --dtype bf16 --all --wall-steps 500 --json bench.json
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from dataclasses import dataclass

import torch

from clic.config import GenerateConfig, TransferConfig, learn_config
from clic.models import device_name, parse_dtype
from clic.runs import reads_losses
from clic.speed import GRAPH_OPTIONS, compiles, sync_interval, with_cuda_graphs
from clic.generate import generate
from clic.transfer import transfer

from .common import (bench_inputs, learning_config, load_bench_backbone, peak_memory, reset_peak, run_learning,
                     sync)
from .counting import (OpCounter, TensorMemory, compile_counts, count_learning_flops, count_learning_memory,
                       count_learning_ops, count_transfer_ops, profile_learning, profile_table)
from .reference import ExplicitSoftmaxCrossAttn, learn_reference
from .report import format_report

__all__ = ["BenchOptions", "run_bench", "bench_learning", "bench_sampling", "fastest_levers", "as_dtype", "LEVERS",
           "load_bench_backbone", "learn_reference", "ExplicitSoftmaxCrossAttn", "format_report", "compile_counts",
           "count_learning_flops", "count_learning_memory", "count_learning_ops", "count_transfer_ops",
           "profile_learning", "profile_table", "OpCounter", "TensorMemory"]
_inputs = bench_inputs

#: the levers of ``--levers``: LearnConfig overrides, each measured alone against the fast path
LEVERS = {
    # the fast path with --cuda-graphs off: what the defaults cost without CUDA graphs (on the CPU: the fast path)
    "eager": {"cuda_graphs": "off"},
    "gradient-checkpointing": {"gradient_checkpointing": True},
    "channels-last": {"channels_last": True},
    "fused-adam": {"adam_impl": "fused"},
    "compile": {"compile_unet": True, "compile_text": True},
    "compile-cudagraphs": {"compile_unet": True, "compile_text": True, "compile_mode": "reduce-overhead"},
    "cudagraphs": {"compile_unet": True, "compile_text": True, "compile_mode": "cudagraphs"},
    # once the host is out of the loop the GPU's own time counts, and channels-last removes cuDNN's layout
    # conversions around the convolutions (BENCHMARKS.md); what --cuda-graphs on sets
    "cudagraphs-channels-last": dict(GRAPH_OPTIONS),
    # the whole step (update included) recorded as one CUDA graph by torch.cuda.graph, channels-last: no tracing
    "capture": {"cuda_graphs": "capture"},
}
#: levers that cost speed for memory: never part of the fastest combination
MEMORY_LEVERS = ("gradient-checkpointing",)
#: levers that exclude each other (the fastest of them joins the combination)
EXCLUSIVE_LEVERS = ("compile", "compile-cudagraphs", "cudagraphs", "cudagraphs-channels-last", "capture")


def bench_learning(backbone, steps: int = 20, warmup: int = 3, **cfg) -> dict:
    """Learn ``warmup + steps`` steps with ``cfg`` (LearnConfig overrides); the first step's excess over the median
    is reported as ``first_step_extra_s`` (torch.compile's compile time, CUDA start-up). A compiled run also
    reports what torch.compile did during it (:func:`compile_counts`). ``reference_path=True``: the reference
    path (:func:`.reference.learn_reference`)."""
    config, reference = learning_config(warmup + steps, **cfg)
    every = 1 if reference else sync_interval(config, backbone.device)
    resolved = dataclasses.replace(config, cuda_graphs="off") if reference else with_cuda_graphs(config,
                                                                                               backbone.device)
    times: list[float] = []
    last = [0.0, 0]                                                         # time and step of the last read
    losses: list[float] = []

    def tick(step, record):
        losses.append(record["loss"])
        # the loop reports the steps since its last read of the losses together: each gets their mean time
        if not reads_losses(step, 0, config.steps, every):
            return
        sync(backbone.device)
        now = time.perf_counter()
        times.extend([(now - last[0]) / (step - last[1])] * (step - last[1]))
        last[:] = now, step

    reset_peak(backbone.device)
    counts = compile_counts()
    sync(backbone.device)
    t0 = last[0] = time.perf_counter()
    run_learning(backbone, config, reference, callback=tick)
    wall = time.perf_counter() - t0
    step = statistics.median(times[warmup:])
    compiled = {}
    if compiles(resolved):
        compiled = {"compile": {k: v - counts[k] for k, v in compile_counts().items()}}
    return {"step_median_s": round(step, 4), "steps_500_estimate_s": round(500 * step, 1),
            "wall_s": round(wall, 2), "steps": warmup + steps, "first_step_extra_s": round(times[0] - step, 2),
            "peak_memory_gib": round(peak_memory(backbone.device), 2),
            "sync_every": every, "cuda_graphs": resolved.cuda_graphs,
            # the same seed gives every run the same draws: the first loss (before any update) agrees across levers
            # up to float rounding, a check that a lever computes what the fast path does
            "loss_first": losses[0], "loss_last": losses[-1],
            "config": cfg, **compiled}


def bench_sampling(backbone, steps: int = 50, guided: int = 30, images: int = 4, repeats: int = 1,
                   compile_mode: str | None = None) -> dict:
    """Wall-clock seconds of one transfer (``steps`` DDIM steps from t = 0, the first ``guided`` with the attention
    guidance step), the same transfer unguided, and a two-stage generation of ``images`` images in one batch
    (default t_s), with a concept learned for 2 steps. Best of ``repeats`` (the three take turns, so a busy machine
    slows them alike), after an untimed short run of each (``untimed_first_runs``: the one-off cost of new shapes,
    which a first transfer in a fresh process pays on top). ``compile_mode``: the same with ``--compile-unet
    --compile-mode MODE`` (the untimed runs then hold the compile time)."""
    image, mask = bench_inputs(backbone.resolution)
    concept = run_learning(backbone, learn_config(steps=2, object_class="chair", checkpoint_every=0)).concept
    speed = {"compile_unet": True, "compile_mode": compile_mode} if compile_mode else {}

    def runs(n: int, n_guided: int) -> dict:
        return {
            "transfer_guided_s": lambda: transfer(backbone, concept, image, mask, TransferConfig(
                steps=n, t_start=0, guidance_range=(0, n_guided), eta=1.0, **speed), progress=False),
            "transfer_unguided_s": lambda: transfer(backbone, concept, image, mask, TransferConfig(
                steps=n, t_start=0, eta=0.0, **speed), progress=False),
            # the short run does both stages (base and concept UNet: each is a graph of its own when compiled)
            f"generate_{images}_s": lambda: generate(backbone, concept, GenerateConfig(
                steps=n, num=images, batch_size=images, base_steps=1 if n < steps else None, **speed),
                progress=False),
        }

    # untimed: every shape once (kernel selection, cuDNN plans, the VAE decoder's first run)
    cold = {}
    for name, run in runs(min(steps, 3), min(guided, 2)).items():
        sync(backbone.device)
        start = time.perf_counter()
        run()
        sync(backbone.device)
        cold[name.removesuffix("_s") + "_warmup_s"] = round(time.perf_counter() - start, 3)
    times: dict[str, list[float]] = {name: [] for name in runs(steps, guided)}
    reset_peak(backbone.device)
    for _ in range(repeats):
        for name, run in runs(steps, guided).items():
            sync(backbone.device)
            start = time.perf_counter()
            run()
            sync(backbone.device)
            times[name].append(time.perf_counter() - start)
    return {"steps": steps, "guided_steps": guided, "images": images, "repeats": repeats,
            **({"compile_mode": compile_mode} if compile_mode else {}),
            **{name: round(min(t), 3) for name, t in times.items()},
            "peak_memory_gib": round(peak_memory(backbone.device), 2), "untimed_first_runs": cold}


@dataclass
class BenchOptions:
    model: str = "tiny"
    device: str | None = None
    dtype: str = "fp32"
    steps: int = 20
    warmup: int = 3
    reference: bool = False
    levers: bool = False
    lever_names: tuple[str, ...] | None = None     # which of LEVERS (default: all, in their order)
    sampling: bool = False
    sampling_steps: int = 50
    sampling_compile: str | None = None             # also time sampling with the UNet compiled in this mode
    images: int = 4
    repeats: int = 1
    profile: bool = False
    flops: bool = False
    tflops: float = 400.0
    tensor_memory: bool = False
    ops: bool = False
    wall_steps: int = 0


def as_dtype(backbone, dtype: str):
    """The same modules cast in place to ``dtype`` (speed does not depend on weight values: the reference path's fp32
    copy of a bf16 backbone is as good as a fresh one, and costs no second build)."""
    dt = parse_dtype(dtype)
    for m in backbone.modules:
        m.to(backbone.device, dt)
    return dataclasses.replace(backbone, dtype=dt)


def run_bench(opts: BenchOptions, on_update=None, log=None) -> dict:
    """Everything ``opts`` asks for, on one backbone (the reference path on an fp32 one), as one JSON-able dict.

    Sections run most-wanted first (learning, 500-step run, sampling, FLOPs, profile, memory count, reference,
    levers: compile is last, it can take minutes). A section that fails (out of memory, a compiler error) is
    recorded under ``errors`` and the others still run; ``on_update(result)`` is called after each, so a run cut
    short keeps what it measured, and ``log(text)`` reports each section's own wall time."""
    start = time.perf_counter()
    backbone = load_bench_backbone(opts.model, opts.device, opts.dtype)
    result = {"model": opts.model, "device": device_name(backbone.device), "dtype": opts.dtype,
              "resolution": backbone.resolution, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "sections_s": {}}

    def finished(section: str, t0: float) -> None:
        result["sections_s"][section] = round(time.perf_counter() - t0, 1)
        if log is not None:
            status = "failed" if section in result.get("errors", {}) else "done"
            log(f"bench: {section} {status} in {result['sections_s'][section]} s "
                f"({time.perf_counter() - start:.0f} s in all)")
        if on_update is not None:
            on_update(result)

    def measure(section: str, fn, into: dict, key: str):
        """``into[key] = fn()`` (None on failure), then report and save."""
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:                       # noqa: BLE001 -- reported, and the next section runs
            value = None
            result.setdefault("errors", {})[section] = f"{type(exc).__name__}: {exc}"[:500]
            if log is not None:                        # the whole traceback for the log: where it failed
                log(f"bench: {section} failed:\n{traceback.format_exc()}")
            if backbone.device.type == "cuda":
                torch.cuda.empty_cache()
        into[key] = value
        finished(section, t0)
        return value

    finished("model", start)
    fast = None
    if opts.steps > 0:
        fast = measure("learning", lambda: bench_learning(backbone, opts.steps, opts.warmup), result, "learning")
    if opts.wall_steps > 0:
        measure("learning_wall", lambda: bench_learning(backbone, opts.wall_steps, 0), result, "learning_wall")
    if opts.sampling:
        measure("sampling", lambda: bench_sampling(
            backbone, opts.sampling_steps, min(30, opts.sampling_steps), opts.images, opts.repeats), result, "sampling")
    if opts.sampling_compile:
        measure("sampling compiled", lambda: bench_sampling(
            backbone, opts.sampling_steps, min(30, opts.sampling_steps), opts.images, opts.repeats,
            opts.sampling_compile), result, "sampling_compiled")
    flops = {}
    if opts.flops:
        result["flops"] = flops
        measure("flops", lambda: count_learning_flops(backbone, tflops=opts.tflops), flops, "fast")
    if opts.ops:
        measure("ops", lambda: count_learning_ops(backbone), result, "ops")
        measure("transfer ops", lambda: count_transfer_ops(backbone), result, "transfer_ops")
    if opts.profile:
        measure("profile", lambda: profile_learning(backbone), result, "profile")
        if backbone.device.type == "cuda":     # and the default GPU step: how busy CUDA graphs keep the GPU
            measure("profile graphs", lambda: profile_learning(backbone, cuda_graphs="on"), result, "profile_graphs")
    if opts.tensor_memory:
        measure("tensor_memory", lambda: {
            "fast": count_learning_memory(backbone),
            "gradient-checkpointing": count_learning_memory(backbone, gradient_checkpointing=True)},
            result, "tensor_memory")
    if (opts.reference and fast is not None) or opts.flops:
        ref_backbone = as_dtype(backbone, "fp32") if opts.dtype != "fp32" else backbone   # the reference is fp32
        if opts.reference and fast is not None:
            ref = measure("reference", lambda: bench_learning(
                ref_backbone, opts.steps, opts.warmup, reference_path=True), result, "reference")
            if ref is not None:
                result["speedup_vs_reference"] = round(ref["step_median_s"] / fast["step_median_s"], 2)
        if opts.flops:
            measure("flops reference", lambda: count_learning_flops(
                ref_backbone, tflops=opts.tflops, reference_path=True), flops, "reference")
        if ref_backbone is not backbone:
            backbone = as_dtype(backbone, opts.dtype)
        # how far each measured step is from its FLOP floor: the achieved TFLOP/s
        for path, timed in (("fast", fast), ("reference", result.get("reference"))):
            if timed is not None and flops.get(path) is not None:
                flops[path]["achieved_tflops"] = round(flops[path]["step_gflop"] / 1e3 / timed["step_median_s"], 4)
    if opts.levers and fast is not None:
        levers = result["levers"] = {}
        for name in opts.lever_names or LEVERS:
            overrides = LEVERS[name]
            timed = measure(f"lever {name}", lambda o=overrides: bench_learning(
                backbone, opts.steps, opts.warmup, **o), levers, name)
            if timed is not None:
                timed["speedup_vs_fast"] = round(fast["step_median_s"] / timed["step_median_s"], 2)
                if fast.get("loss_first"):
                    timed["loss_first_rel_diff"] = round(abs(timed["loss_first"] / fast["loss_first"] - 1), 5)
        paying = fastest_levers(levers)
        if paying:
            # the paying levers together, over the --wall-steps run when there is one (a graph
            # the lever run compiled is reused: its compile time is the lever row's first-step extra)
            n, warm = (opts.wall_steps, 0) if opts.wall_steps > 0 else (opts.steps, opts.warmup)
            combined = measure("levers combined", lambda: bench_learning(
                backbone, n, warm, **{k: v for name in paying for k, v in LEVERS[name].items()}), levers, "combined")
            if combined is not None:
                combined["levers"] = paying
                combined["speedup_vs_fast"] = round(fast["step_median_s"] / combined["step_median_s"], 2)
    return result


def fastest_levers(levers: dict, gain: float = 1.03) -> list[str]:
    """The levers measured faster than the fast path by more than ``gain``, memory levers left out, and of the
    mutually exclusive ones the fastest."""
    paying = [name for name, v in levers.items()
              if name in LEVERS and name not in MEMORY_LEVERS and v is not None and v["speedup_vs_fast"] > gain]
    exclusive = [name for name in paying if name in EXCLUSIVE_LEVERS]
    if len(exclusive) > 1:
        best = min(exclusive, key=lambda name: levers[name]["step_median_s"])
        paying = [name for name in paying if name not in EXCLUSIVE_LEVERS or name == best]
    return paying


