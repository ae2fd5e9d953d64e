"""``clic bench``: speed and memory of learning, transfer and generation (the numbers of BENCHMARKS.md).

Prints and writes JSON:

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

Sections run most-wanted first and ``--json`` is rewritten after each, so a run cut short keeps what it measured.
Speed does not depend on weight values, so ``--model sd14-random`` builds the SD1.4 architecture in memory
(nothing written to disk). ``--all`` is everything, the command for a GPU machine (``scripts/device_bench.sh``
runs it on this workplace's lent one)::

    clic bench --model sd14-random --device cuda --dtype bf16 --all --wall-steps 500 --json bench.json
"""

from __future__ import annotations

import functools
import json
import platform
import resource
import statistics
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .speed import COMPILE_MODES, GRAPH_OPTIONS, compiles, with_cuda_graphs
from .tokens import free_placeholder

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
    # once the host is out of the loop the GPU's own time counts: cuDNN's NCHW <-> NHWC conversions around every
    # bf16 convolution were a fifth of it on the H200 (run 2's profile), and channels-last removes them
    # (what --cuda-graphs on sets: the default on a GPU since the H100's run 1)
    "cudagraphs-channels-last": dict(GRAPH_OPTIONS),
}
#: levers that cost speed for memory: never part of the fastest combination
MEMORY_LEVERS = ("gradient-checkpointing",)
#: levers that exclude each other (the fastest of them joins the combination)
EXCLUSIVE_LEVERS = ("compile", "compile-cudagraphs", "cudagraphs", "cudagraphs-channels-last")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def load_bench_backbone(model: str, device=None, dtype="fp32"):
    """A backbone for timing: a kind of :data:`clic.builder.SPECS` built in memory (random weights), or a model
    folder / hub id through :func:`clic.models.load_backbone`."""
    from .builder import SPECS, build_pipeline
    from .models import Backbone, load_backbone, parse_dtype, pick_device

    if model in SPECS:
        pipe = build_pipeline(model)
        device = pick_device(device)
        dt = parse_dtype(dtype)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False).eval().to(device, dt)
        return Backbone(model, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, dict(pipe.scheduler.config),
                        device, dt, extra={"base_vocab_size": len(pipe.tokenizer)})
    return load_backbone(model, device, dtype)


def _inputs(size: int):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, size, size)
    mask[:, size // 8: size // 2, size // 4: 3 * size // 4] = 1
    return image, mask


def compile_counts() -> dict:
    """torch.compile's running counts: graphs compiled (a learning run compiles one per compiled model unless
    something recompiles), graph breaks, and graphs kept off CUDA graphs under a CUDA-graph mode (the reasons, and
    those of any recompilation: ``TORCH_LOGS=cudagraphs,recompiles,graph_breaks``)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def bench_learning(backbone, steps: int = 20, warmup: int = 3, **cfg) -> dict:
    """Learn ``warmup + steps`` steps with ``cfg`` (LearnConfig overrides); the first step's excess over the median
    is reported as ``first_step_extra_s`` (torch.compile's compile time, CUDA start-up). A compiled run also
    reports what torch.compile did during it (:func:`compile_counts`)."""
    from .learn import learn, make_config, reads_losses, sync_interval

    image, mask = _inputs(backbone.resolution)
    cfg = {"placeholder": free_placeholder(backbone, "<v*>"), **cfg}     # every run adds its own token
    config = make_config(steps=warmup + steps, object_class="chair", checkpoint_every=0, **cfg)
    every = sync_interval(config, backbone.device)
    resolved = with_cuda_graphs(config, backbone.device)
    times: list[float] = []
    last = [0.0, 0]                                                         # time and step of the last read
    losses: list[float] = []

    def tick(step, record):
        losses.append(record["loss"])
        # the loop reports the steps since its last read of the losses together: each gets their mean time
        if not reads_losses(step, 0, config.steps, every):
            return
        _sync(backbone.device)
        now = time.perf_counter()
        times.extend([(now - last[0]) / (step - last[1])] * (step - last[1]))
        last[:] = now, step

    _reset_peak(backbone.device)
    counts = compile_counts()
    _sync(backbone.device)
    t0 = last[0] = time.perf_counter()
    learn(backbone, [image], [mask], config, progress=False, callback=tick)
    wall = time.perf_counter() - t0
    step = statistics.median(times[warmup:])
    compiled = {}
    if compiles(resolved):
        compiled = {"compile": {k: v - counts[k] for k, v in compile_counts().items()}}
    return {"step_median_s": round(step, 4), "steps_500_estimate_s": round(500 * step, 1),
            "wall_s": round(wall, 2), "steps": warmup + steps, "first_step_extra_s": round(times[0] - step, 2),
            "peak_memory_gib": round(_peak_memory(backbone.device), 2),
            "sync_every": every, "cuda_graphs": resolved.cuda_graphs,
            # the same seed gives every run the same draws: the first loss (before any update) agrees across levers
            # up to float rounding, a check that a lever computes what the fast path does
            "loss_first": losses[0], "loss_last": losses[-1],
            "config": {k: v for k, v in cfg.items() if k != "placeholder"}, **compiled}


def bench_sampling(backbone, steps: int = 50, guided: int = 30, images: int = 4, repeats: int = 1,
                   compile_mode: str | None = None) -> dict:
    """Wall-clock seconds of one transfer (``steps`` DDIM steps from t = 0, the first ``guided`` with the attention
    guidance step), the same transfer unguided, and a two-stage generation of ``images`` images in one batch
    (default t_s), with a concept learned for 2 steps. Best of ``repeats`` (the three take turns, so a busy machine
    slows them alike), after an untimed short run of each (``untimed_first_runs``: the one-off cost of new shapes,
    which a first transfer in a fresh process pays on top). ``compile_mode``: the same with ``--compile-unet
    --compile-mode MODE`` (the untimed runs then hold the compile time)."""
    from .generate import GenerateConfig, generate
    from .learn import learn, make_config
    from .transfer import TransferConfig, transfer

    image, mask = _inputs(backbone.resolution)
    concept = learn(backbone, [image], [mask], make_config(
        steps=2, object_class="chair", checkpoint_every=0, placeholder=free_placeholder(backbone, "<v*>")),
        progress=False).concept
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
        _sync(backbone.device)
        start = time.perf_counter()
        run()
        _sync(backbone.device)
        cold[name.removesuffix("_s") + "_warmup_s"] = round(time.perf_counter() - start, 3)
    times: dict[str, list[float]] = {name: [] for name in runs(steps, guided)}
    _reset_peak(backbone.device)
    for _ in range(repeats):
        for name, run in runs(steps, guided).items():
            _sync(backbone.device)
            start = time.perf_counter()
            run()
            _sync(backbone.device)
            times[name].append(time.perf_counter() - start)
    return {"steps": steps, "guided_steps": guided, "images": images, "repeats": repeats,
            **({"compile_mode": compile_mode} if compile_mode else {}),
            **{name: round(min(t), 3) for name, t in times.items()},
            "peak_memory_gib": round(_peak_memory(backbone.device), 2), "untimed_first_runs": cold}


def profile_learning(backbone, steps: int = 3, warmup: int = 2, rows: int = 15, **cfg) -> dict:
    """:func:`profile_table` of ``steps`` learning steps with ``cfg`` (LearnConfig overrides; default: the eager
    step, ``--cuda-graphs off``), after ``warmup`` + 1 untraced ones; the set-up before the first step and the
    concept's extraction after the last are outside the window."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from .learn import learn, make_config

    image, mask = _inputs(backbone.resolution)
    cuda = backbone.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    config = make_config(steps=warmup + 1 + steps, object_class="chair", checkpoint_every=0, sync_every=1,
                         placeholder=free_placeholder(backbone, "<v*>"), **{"cuda_graphs": "off", **cfg})
    with profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=steps, repeat=1),
                 acc_events=True) as prof:
        learn(backbone, [image], [mask], config, progress=False,
              callback=lambda step, record: (_sync(backbone.device), prof.step()))
    return profile_table(prof.key_averages(), steps, cuda, rows)


def profile_table(events, steps: int, cuda: bool, rows: int = 15) -> dict:
    """Where a profiled step's time goes. ``step_ms``: the step's wall time (the profiler's step spans; each step
    ends in a device sync). On a GPU, ``device_busy_ms``: the summed time of the kernels and copies the step ran,
    whose shortfall from ``step_ms`` is the time the GPU waited for the host; the rows are those kernels and
    copies by their time, shares of ``device_busy_ms``. Without a GPU the rows are operators by self CPU time."""
    steps_total = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep"))
    events = [e for e in events if not e.key.startswith("ProfilerStep")]
    if cuda:
        events = [e for e in events if getattr(e.device_type, "name", str(e.device_type)).endswith("CUDA")]
        attr = "self_device_time_total"
    else:
        attr = "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:rows]
    return {"step_ms": round(steps_total / 1e3 / steps, 2) if steps_total else None,
            "device_busy_ms": round(total / 1e3 / steps, 2) if cuda else None,
            "rows": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                      "self_ms_per_step": round(getattr(e, attr) / 1e3 / steps, 3),
                      "share": round(getattr(e, attr) / (total or 1.0), 4)} for e in top]}


def count_learning_flops(backbone, steps: int = 2, tflops: float = 400.0, **cfg) -> dict:
    """FLOPs of one learning step with ``cfg`` (LearnConfig overrides): the count between the ends of the last two
    of ``steps + 1`` steps (so the one-off work before the first step, e.g. caching the source latent, is apart:
    ``setup_gflop``). The eager step (``--cuda-graphs off`` unless ``cfg`` says otherwise). Attention runs in its
    math form while counting, so SDPA's matmuls are counted on every device. ``floor_500_steps_s``: 500 steps at ``tflops`` TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .learn import learn, make_config

    image, mask = _inputs(backbone.resolution)
    counter = FlopCounterMode(display=False)
    marks: list[int] = []
    by_op: list[dict] = []

    def mark(step, record):
        marks.append(counter.get_total_flops())
        by_op.append({str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()})

    config = make_config(steps=steps + 1, object_class="chair", checkpoint_every=0, sync_every=1,
                         placeholder=free_placeholder(backbone, "<v*>"), **{"cuda_graphs": "off", **cfg})
    with sdpa_kernel(SDPBackend.MATH), counter:
        learn(backbone, [image], [mask], config, progress=False, callback=mark)
    step = marks[-1] - marks[-2]
    ops = {op: n - by_op[-2].get(op, 0) for op, n in by_op[-1].items()}
    ops = {op.replace("aten.", ""): round(n / 1e9, 3) for op, n in sorted(ops.items(), key=lambda kv: -kv[1]) if n}
    return {"step_gflop": round(step / 1e9, 3), "setup_gflop": round((marks[0] - step) / 1e9, 3),
            "by_op_gflop": ops, "floor_500_steps_s": round(500 * step / (tflops * 1e12), 3),
            "at_tflops": tflops, "config": cfg}


#: operators that launch no device work: views and the allocations behind new tensors
NO_KERNEL_OPS = {"aten._unsafe_view", "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched (``counts``: by overload packet), e.g. within one learning step."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.no_kernel: set[str] = set(NO_KERNEL_OPS)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        if func.is_view:
            self.no_kernel.add(name)
        return func(*args, **(kwargs or {}))


def count_learning_ops(backbone, steps: int = 2, rows: int = 12, **cfg) -> dict:
    """The operators one learning step with ``cfg`` (LearnConfig overrides) dispatches, counted between the ends of
    the last two of ``steps + 1`` steps: ``ops_per_step`` in all and ``kernel_ops_per_step``, those that launch device
    work (views and allocations left out: an estimate of the kernels the host launches one by one in an eager step).
    Adam runs fused, as it does on a GPU; the step is the eager one (``--cuda-graphs off``: a replayed graph
    dispatches nothing). The count depends on the model's architecture, not on its width, resolution
    or device; its cost is the host's (BENCHMARKS.md: the eager step on a GPU waits for it)."""
    from .learn import learn, make_config

    image, mask = _inputs(backbone.resolution)
    counter = OpCounter()
    marks: list[dict] = []
    config = make_config(steps=steps + 1, object_class="chair", checkpoint_every=0, adam_impl="fused", sync_every=1,
                         placeholder=free_placeholder(backbone, "<v*>"), **{"cuda_graphs": "off", **cfg})
    with counter:
        learn(backbone, [image], [mask], config, progress=False,
              callback=lambda step, record: marks.append(dict(counter.counts)))
    step = {op: n - marks[-2].get(op, 0) for op, n in marks[-1].items() if n > marks[-2].get(op, 0)}
    kernels = {op: n for op, n in step.items() if op not in counter.no_kernel}
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:rows]
    return {"ops_per_step": sum(step.values()), "kernel_ops_per_step": sum(kernels.values()),
            "top_kernel_ops": {op.replace("aten.", ""): n for op, n in top}, "config": cfg}


def count_transfer_ops(backbone, kv_cache: bool = True) -> dict:
    """The operators of one guided and one unguided denoising step of a transfer (CFG, DDIM; a concept learned for
    one step), counted as :func:`count_learning_ops` does, each step after a step of its kind (so the text K/V
    cache, :func:`clic.attention.text_kv_cached`, is warm). ``kv_cache=False``: the same with the K/V projected
    at every step, as before the cache (an A/B of the host's work)."""
    import contextlib
    from unittest import mock

    from .learn import learn, make_config
    from .transfer import TransferConfig, transfer

    image, mask = _inputs(backbone.resolution)
    concept = learn(backbone, [image], [mask], make_config(
        steps=1, object_class="chair", checkpoint_every=0, placeholder=free_placeholder(backbone, "<v*>")),
        progress=False).concept
    counter = OpCounter()
    marks: list[dict] = []
    patch = (contextlib.nullcontext() if kv_cache else
             mock.patch("clic.sampling.text_kv_cached", lambda unet, enabled=True: contextlib.nullcontext()))
    with patch, counter:
        transfer(backbone, concept, image, mask, TransferConfig(steps=4, t_start=0, guidance_range=(0, 2), eta=1.0),
                 progress=False, callback=lambda info: marks.append(dict(counter.counts)))

    def between(a: dict, b: dict) -> dict:
        step = {op: n - a.get(op, 0) for op, n in b.items() if n > a.get(op, 0)}
        return {"ops": sum(step.values()),
                "kernel_ops": sum(n for op, n in step.items() if op not in counter.no_kernel)}

    return {"guided_step": between(marks[0], marks[1]), "unguided_step": between(marks[2], marks[3]),
            "kv_cache": kv_cache}


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of live tensor storages: every op's outputs are tracked until their storage is freed (a weak
    reference's callback); ``base`` is what lived before (the model's weights). ``peak`` / ``current`` in bytes."""

    def __init__(self, base: int = 0):
        super().__init__()
        self.current = self.peak = base
        self._refs: dict[int, weakref.ref] = {}

    @staticmethod
    def storage_bytes(tensors) -> int:
        seen = {}
        for t in tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def _free(self, key: int, nbytes: int, _ref) -> None:
        if self._refs.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = id(st)
                if key not in self._refs:
                    nbytes = st.nbytes()
                    self._refs[key] = weakref.ref(st, functools.partial(self._free, key, nbytes))
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
        return out


def count_learning_memory(backbone, steps: int = 2, **cfg) -> dict:
    """Peak live-tensor memory (GiB) of ``steps`` learning steps with ``cfg`` (LearnConfig overrides), on top of
    the model's weights (``weights_gib``) that live before; see :class:`TensorMemory`."""
    import gc

    from .attention import swapped_processors
    from .learn import learn, make_config

    image, mask = _inputs(backbone.resolution)
    modules = (backbone.unet, backbone.vae, backbone.text_encoder)
    weights = TensorMemory.storage_bytes([t for m in modules for t in (*m.parameters(), *m.buffers())])
    config = make_config(steps=steps, object_class="chair", checkpoint_every=0,
                         placeholder=free_placeholder(backbone, "<v*>"), **{"cuda_graphs": "off", **cfg})
    gc.collect()
    # learn() leaves its trained cross-attention copies installed: put the processors found back afterwards, so
    # that every count starts from the same base model
    with swapped_processors(backbone.unet, dict(backbone.unet.attn_processors)), TensorMemory(weights) as counter:
        learn(backbone, [image], [mask], config, progress=False)
    return {"peak_gib": round(counter.peak / 2**30, 3), "weights_gib": round(weights / 2**30, 3),
            "config": cfg}


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
    import dataclasses

    from .models import parse_dtype

    dt = parse_dtype(dtype)
    for m in (backbone.unet, backbone.vae, backbone.text_encoder):
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
    result = {"model": opts.model, "device": _device_name(backbone.device), "dtype": opts.dtype,
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


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _short(name: str, width: int = 80) -> str:
    """A CUDA kernel's templated name cut to ``width`` characters."""
    return name if len(name) <= width else name[:width - 3] + "..."


def _s(value, unit=" s") -> str:
    return "" if value is None else f"{value}{unit}"


def format_report(result: dict) -> str:
    """Markdown tables of a :func:`run_bench` result (``clic bench --report bench.json``), in BENCHMARKS.md's
    layout: learning fast vs reference with transfer and generation, the measured N-step wall time, the levers,
    the FLOP floor against the measured step, counted memory, and the profiler table."""
    lines = [f"{result['model']} on {result['device']}, {result['dtype']}, {result['resolution']} px, torch "
             f"{result['torch']}, {result['date']}", ""]
    fast, ref, sampling = result.get("learning"), result.get("reference"), result.get("sampling") or {}
    gen = next((k for k in sampling if k.startswith("generate_")), None)
    if fast:
        graphs = " (CUDA graphs)" if fast.get("cuda_graphs") == "on" else ""
        rows = [[f"fast{graphs}", _s(fast["step_median_s"]), _s(fast["steps_500_estimate_s"]),
                 _s(result.get("speedup_vs_reference"), "x"), _s(sampling.get("transfer_guided_s")),
                 _s(sampling.get("transfer_unguided_s")), _s(sampling.get(gen)) if gen else "",
                 _s(fast["peak_memory_gib"], " GiB")]]
        if ref:
            rows.append(["reference", _s(ref["step_median_s"]), _s(ref["steps_500_estimate_s"]), "", "", "", "",
                         _s(ref["peak_memory_gib"], " GiB")])
        lines += _table(["path", "step (median)", "500 steps (est.)", "speed-up vs reference", "transfer (guided)",
                         "transfer (unguided)", f"generation of {sampling.get('images', '')}".strip(), "peak memory"],
                        rows)
    cold = sampling.get("untimed_first_runs")
    if cold:
        lines += ["Transfer and generation are timed after an untimed short run of each (new shapes' one-off cost, "
                  "paid once per process: " + ", ".join(f"{k.replace('_warmup_s', '')} {v} s" for k, v in cold.items())
                  + ").", ""]
    graphed = result.get("sampling_compiled")
    if graphed:
        g_gen = next((k for k in graphed if k.startswith("generate_")), None)
        cold = graphed.get("untimed_first_runs", {})
        lines += [f"With the UNet compiled (`--compile-unet --compile-mode {graphed['compile_mode']}`): transfer "
                  f"guided **{_s(graphed['transfer_guided_s'])}**, unguided {_s(graphed['transfer_unguided_s'])}, "
                  f"generation of {graphed['images']} {_s(graphed.get(g_gen))}; the untimed first runs (compiling) "
                  "took " + ", ".join(f"{k.replace('_warmup_s', '')} {v} s" for k, v in cold.items()) + ".", ""]
    wall = result.get("learning_wall")
    if wall:
        lines += [f"Measured: {wall['steps']} learning steps in one run took **{wall['wall_s']} s** wall (first "
                  f"step {wall['first_step_extra_s']} s over the median), peak {wall['peak_memory_gib']} GiB.", ""]
    levers = result.get("levers")
    if levers:
        lines += _table(["lever", "step", "vs fast", "first-step extra", "peak memory", "first loss vs fast"],
                        [[name, _s(v["step_median_s"]), _s(v["speedup_vs_fast"], "x"), _s(v["first_step_extra_s"]),
                          _s(v["peak_memory_gib"], " GiB"),
                          f"{100 * v['loss_first_rel_diff']:.3g}%" if "loss_first_rel_diff" in v else ""]
                         if v else [name, "failed", "", "", "", ""] for name, v in levers.items()])
    for name, v in (levers or {}).items():
        if v and v.get("compile"):
            c = v["compile"]
            lines += [f"torch.compile in `{name}`: {c['graphs']} graphs compiled, {c['graph_breaks']} graph breaks, "
                      f"CUDA graphs skipped for {c['cudagraph_skips']}.", ""]
    combined = (levers or {}).get("combined")
    if combined and combined.get("levers"):
        lines += [f"The paying levers together ({', '.join(combined['levers'])}): {combined['steps']} learning steps "
                  f"in one run took **{combined['wall_s']} s** wall (first step {combined['first_step_extra_s']} s "
                  f"over the median), peak {combined['peak_memory_gib']} GiB.", ""]
    flops = result.get("flops")
    if flops:
        lines += _table(["path", "per step", "500 steps at floor", "achieved", "top operators (GFLOP)"],
                        [[path, f"{v['step_gflop'] / 1e3:.2f} TFLOP" if v["step_gflop"] >= 100
                          else f"{v['step_gflop']:.3g} GFLOP",
                          f"{v['floor_500_steps_s']:.3g} s at {v['at_tflops']:g} TFLOP/s",
                          f"{v['achieved_tflops']:.3g} TFLOP/s" if "achieved_tflops" in v else "",
                          ", ".join(f"{op} {n:g}" for op, n in list(v["by_op_gflop"].items())[:4])]
                         for path, v in flops.items() if v])
    memory = result.get("tensor_memory")
    if memory:
        lines += _table(["path", "counted peak", "of which weights"],
                        [[name, _s(v["peak_gib"], " GiB"), _s(v["weights_gib"], " GiB")]
                         for name, v in memory.items()])
    ops = result.get("ops")
    if ops:
        lines += [f"Operators of one eager learning step (fast path, `--cuda-graphs off`): {ops['ops_per_step']} "
                  "dispatched, "
                  f"**{ops['kernel_ops_per_step']}** of them launch device work (views and allocations left out); "
                  "the most frequent: " + ", ".join(f"{op} {n}" for op, n in ops["top_kernel_ops"].items()) + ".", ""]
    t_ops = result.get("transfer_ops")
    if t_ops:
        g, u = t_ops["guided_step"]["kernel_ops"], t_ops["unguided_step"]["kernel_ops"]
        lines += [f"Operators launching device work in a transfer step: guided **{g}**, unguided **{u}** "
                  f"(a 50-step transfer with 30 guided: {30 * g + 20 * u:,}).", ""]
    graphs = result.get("profile_graphs")
    if graphs and graphs.get("step_ms") and graphs.get("device_busy_ms") is not None:
        lines += [f"Profiled step with CUDA graphs: {graphs['step_ms']} ms wall, the GPU busy "
                  f"{graphs['device_busy_ms']} ms of it ({100 * graphs['device_busy_ms'] / graphs['step_ms']:.0f}%).", ""]
    profile = result.get("profile")
    if profile:
        if isinstance(profile, list):                       # results written before the summary existed
            profile = {"rows": profile, "step_ms": None, "device_busy_ms": None}
        if profile["step_ms"] and profile["device_busy_ms"] is not None:
            busy = profile["device_busy_ms"]
            lines += [f"Profiled eager step (`--cuda-graphs off`): {profile['step_ms']} ms wall, the GPU busy {busy} "
                      "ms of it "
                      f"({100 * busy / profile['step_ms']:.0f}%; the rest it waited for the host).", ""]
        lines += _table(["kernel or operator", "calls / step", "ms / step", "share"],
                        [[f"`{_short(r['op'])}`", r["calls_per_step"], r["self_ms_per_step"], f"{100 * r['share']:.1f}%"]
                         for r in profile["rows"]])
    for section, error in result.get("errors", {}).items():
        lines += [f"**{section} failed**: `{error}`", ""]
    if result.get("sections_s"):
        lines += ["Section wall times: " + ", ".join(f"{k} {v} s" for k, v in result["sections_s"].items()), ""]
    return "\n".join(lines)


def register_cli(sub, add_model_options) -> None:
    p = sub.add_parser("bench", help="measure speed and memory of learning, transfer and generation "
                                     "(BENCHMARKS.md numbers come from here)")
    p.add_argument("--model", default="tiny",
                   help="a model folder or hub id, or tiny | tiny-sd2 | sd14-random (built in memory)")
    p.add_argument("--steps", type=int, default=20, help="timed learning steps after warm-up (0: no timing, e.g. "
                                                                  "with --flops alone)")
    p.add_argument("--warmup", type=int, default=3, help="untimed learning steps first")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the frozen model (trainable weights stay fp32)")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference path (official code's computation: explicit softmax everywhere, "
                        "fp32, no caching, whole-UNet gradients) and report the speed-up")
    p.add_argument("--levers", action="store_true",
                   help="time each speed/memory lever alone (checkpointing, channels-last, fused Adam, compile)")
    p.add_argument("--lever", action="append", choices=list(LEVERS), default=None, dest="lever_names",
                   help="time only this lever (repeatable; implies --levers)")
    p.add_argument("--sampling", action="store_true", help="also time transfer and generation")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps of transfer and generation")
    p.add_argument("--sampling-compile", metavar="MODE", choices=COMPILE_MODES, default=None,
                   help="also time transfer and generation with --compile-unet --compile-mode MODE (e.g. cudagraphs)")
    p.add_argument("--images", type=int, default=4, help="images of the generation timing (one batch)")
    p.add_argument("--repeats", type=int, default=1, help="sampling timings: best of this many")
    p.add_argument("--profile", action="store_true", help="a profiler table of a few learning steps")
    p.add_argument("--flops", action="store_true",
                   help="count the FLOPs of a learning step (fast and reference path) and the floor they put on 500 "
                        "steps; exact on any device")
    p.add_argument("--tflops", type=float, default=400.0,
                   help="throughput for the --flops floor, TFLOP/s (default 400: a well-fed H100 in bf16)")
    p.add_argument("--tensor-memory", action="store_true",
                   help="peak live-tensor memory of learning counted op by op (an estimate of the GPU peak from any "
                        "device), fast path and with gradient checkpointing")
    p.add_argument("--ops", action="store_true",
                   help="count the operators of one learning step and those that launch device work (the host's "
                        "share of an eager step; exact on any device)")
    p.add_argument("--wall-steps", type=int, default=0,
                   help="also learn this many steps in one run and report its wall time (e.g. 500: the goal measured, "
                        "not extrapolated from the median step)")
    p.add_argument("--all", action="store_true", help="--reference --levers --sampling --profile --flops --ops")
    p.add_argument("--json", default=None, help="also write the result to this JSON file (after every section)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="measure nothing: print the markdown tables of a --json result (for BENCHMARKS.md)")

    def run(args):
        if args.report:
            from .errors import InputError

            path = Path(args.report)
            try:
                text = format_report(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise InputError(f"--report {path}: not a readable bench JSON ({exc})") from None
            except (KeyError, TypeError, AttributeError) as exc:
                raise InputError(f"--report {path}: not a `clic bench --json` result (no {exc})") from None
            print(text)
            return
        every = args.all
        opts = BenchOptions(model=args.model, device=args.device, dtype=args.dtype, steps=args.steps,
                            warmup=args.warmup, reference=args.reference or every,
                            levers=args.levers or every or bool(args.lever_names),
                            lever_names=tuple(args.lever_names) if args.lever_names else None,
                            sampling=args.sampling or every or bool(args.sampling_compile),
                            sampling_steps=args.sampling_steps, sampling_compile=args.sampling_compile, images=args.images,
                            repeats=args.repeats, profile=args.profile or every, flops=args.flops or every,
                            tflops=args.tflops, tensor_memory=args.tensor_memory, ops=args.ops or every,
                            wall_steps=args.wall_steps)

        def save(result: dict) -> None:          # after every section: a run cut short keeps what it measured
            from .fileio import atomic_path

            with atomic_path(Path(args.json)) as tmp:
                Path(tmp).write_text(json.dumps(result, indent=2))

        result = run_bench(opts, on_update=save if args.json else None,
                           log=lambda text: print(text, file=sys.stderr, flush=True))
        if args.json:
            save(result)                          # with what was derived after the last section (speed-ups)
        print(json.dumps(result, indent=2))

    p.set_defaults(func=run)
