"""Counting, rather than timing, what a learning or transfer step does: torch.compile's graphs, a profiler table,
FLOPs, the operators dispatched, and the bytes of live tensors. Counts are exact on any device.

FLOPs and live-tensor bytes depend on shapes only, so they can also be counted with the model on the meta device
(shapes without values, :func:`.common.load_bench_backbone` with ``device="meta"``): an architecture too large for
the machine at hand (SDXL's step at 1024 px) is counted in seconds. There a value read back to the host is zeros
(:class:`MetaValues`), and attention runs as the fused kernel it is on a real device (:func:`fused_attention_on_meta`:
meta tensors otherwise take SDPA's math path, whose attention matrices would be counted)."""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from unittest import mock

import torch
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from clic.config import learn_config
from clic.transfer import TransferConfig, transfer

from .common import bench_inputs, learning_config, run_learning, sync


def compile_counts() -> dict:
    """torch.compile's running counts: graphs compiled (a learning run compiles one per compiled model unless
    something recompiles), graph breaks, and graphs kept off CUDA graphs under a CUDA-graph mode (the reasons, and
    those of any recompilation: ``TORCH_LOGS=cudagraphs,recompiles,graph_breaks``)."""
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def profile_learning(backbone, steps: int = 3, warmup: int = 2, rows: int = 15, **cfg) -> dict:
    """:func:`profile_table` of ``steps`` learning steps with ``cfg`` (LearnConfig overrides; default: the eager
    step, ``--cuda-graphs off``), after ``warmup`` + 1 untraced ones; the set-up before the first step and the
    concept's extraction after the last are outside the window."""
    cuda = backbone.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    config, reference = learning_config(warmup + 1 + steps, sync_every=1, **{"cuda_graphs": "off", **cfg})
    with profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=steps, repeat=1),
                 acc_events=True) as prof:
        run_learning(backbone, config, reference, callback=lambda step, record: (sync(backbone.device), prof.step()))
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


class MetaValues(TorchDispatchMode):
    """For models on the meta device, where no value exists: a copy to the host comes back as zeros, and a scalar
    read (``.item()``) as 0 (the loss terms a learning loop logs, the weight statistics a concept file records)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.device.type == "meta":
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
                    and torch.device(kwargs["device"]).type != "meta":
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype, device=kwargs["device"])
            if func is torch.ops.aten._local_scalar_dense.default:
                return False if source.dtype == torch.bool else 0 if not source.is_floating_point() else 0.0
        return func(*args, **kwargs)


def on_values_of(backbone):
    """:class:`MetaValues` for a backbone on the meta device, else nothing."""
    return MetaValues() if backbone.device.type == "meta" else contextlib.nullcontext()


@contextlib.contextmanager
def fused_attention_on_meta(enabled: bool = True):
    """While inside, ``F.scaled_dot_product_attention`` on meta tensors runs as one fused kernel (the CPU's flash
    attention: what it keeps for backward is the output and a logsumexp per query, as a GPU's flash kernel) instead of
    the math path meta tensors get by default (which keeps every (N, L) attention matrix)."""
    if not enabled:
        yield
        return
    plain = torch.nn.functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or kwargs.get("enable_gqa"):
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    with mock.patch("torch.nn.functional.scaled_dot_product_attention", fused):
        yield


def count_learning_flops(backbone, steps: int = 2, tflops: float = 400.0, **cfg) -> dict:
    """FLOPs of one learning step with ``cfg`` (LearnConfig overrides): the count between the ends of the last two
    of ``steps + 1`` steps (so the one-off work before the first step, e.g. caching the source latent, is apart:
    ``setup_gflop``). The eager step (``--cuda-graphs off`` unless ``cfg`` says otherwise). Attention runs in its
    math form while counting, so SDPA's matmuls are counted on every device. ``floor_500_steps_s``: 500 steps at ``tflops`` TFLOP/s."""
    counter = FlopCounterMode(display=False)
    marks: list[int] = []
    by_op: list[dict] = []

    def mark(step, record):
        marks.append(counter.get_total_flops())
        by_op.append({str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()})

    config, reference = learning_config(steps + 1, sync_every=1, **{"cuda_graphs": "off", **cfg})
    with on_values_of(backbone), sdpa_kernel(SDPBackend.MATH), counter:
        run_learning(backbone, config, reference, callback=mark)
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
    counter = OpCounter()
    marks: list[dict] = []
    config, reference = learning_config(steps + 1, adam_impl="fused", sync_every=1, **{"cuda_graphs": "off", **cfg})
    with counter:
        run_learning(backbone, config, reference, callback=lambda step, record: marks.append(dict(counter.counts)))
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
    image, mask = bench_inputs(backbone.resolution)
    concept = run_learning(backbone, learn_config(steps=1, object_class="chair", checkpoint_every=0)).concept
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
    reference's callback); ``base`` is what lived before (the model's weights). ``peak`` / ``current`` in bytes.
    ``existing``: tensors that lived before (the weights): an op's output that is a view of one of them (a linear
    layer's ``weight.t()``, a ``detach``) is no new memory. ``meta``: count meta tensors too (a model on the meta
    device; by default they are placeholders, not memory)."""

    def __init__(self, base: int = 0, meta: bool = False, existing=()):
        super().__init__()
        self.current = self.peak = base
        self.meta = meta
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self._refs: dict[int, weakref.ref] = {}

    @staticmethod
    def storage_bytes(tensors) -> int:
        seen = {}
        for t in tensors:
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()         # the storage itself (meta storages all have data pointer 0)
        return sum(seen.values())

    def _free(self, key: int, nbytes: int, _ref) -> None:
        if self._refs.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and (self.meta or t.device.type != "meta"):
                st = t.untyped_storage()
                key = id(st)
                if key not in self._refs and st._cdata not in self._existing:
                    nbytes = st.nbytes()
                    self._refs[key] = weakref.ref(st, functools.partial(self._free, key, nbytes))
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
        return out


def count_learning_memory(backbone, steps: int = 2, **cfg) -> dict:
    """Peak live-tensor memory (GiB) of ``steps`` learning steps with ``cfg`` (LearnConfig overrides), on top of
    the model's weights (``weights_gib``) that live before; see :class:`TensorMemory` (and the module's note on the
    meta device)."""
    tensors = [t for m in backbone.modules for t in (*m.parameters(), *m.buffers())]
    weights = TensorMemory.storage_bytes(tensors)
    config, reference = learning_config(steps, **{"cuda_graphs": "off", **cfg})
    gc.collect()
    meta = backbone.device.type == "meta"
    with fused_attention_on_meta(meta), on_values_of(backbone), \
            TensorMemory(weights, meta=meta, existing=tensors) as counter:
        run_learning(backbone, config, reference)
    return {"peak_gib": round(counter.peak / 2**30, 3), "weights_gib": round(weights / 2**30, 3),
            "config": cfg}
