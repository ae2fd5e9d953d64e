"""A whole step as one CUDA graph (``--cuda-graphs capture``): the learning step's forward, backward and optimiser
update recorded once with ``torch.cuda.graph`` and replayed at every later step.

Why: on a fast GPU the eager step is bound by the host launching ~2,100 kernels; replaying one graph costs the host
one launch. torch.compile's ``cudagraphs`` backend (``--cuda-graphs on``) does the same for the UNet and the text
layers but traces them with dynamo first (14-36 s once a process on the SD1.4 UNet, BENCHMARKS.md); recording the
step as it runs eagerly takes about as long as one eager step, and the optimiser's update is inside the graph too.

What a graph needs, and how the step provides it (:class:`clic.learn.StaticStep` is the learning step written so):

- fixed inputs: every per-step value (timestep, image index and flip, prompt rows, noise, posterior samples) is
  drawn on the host as before and copied into one fixed device tensor before the replay; the step picks the drawn
  image and rows from stacks of the constant sources by device indices (``index_select``), not by host integers;
- nothing read back: the loss values stay on the device (copied out of the graph's output after each replay and
  read in bursts as in the plain loop), no ``.item()``, no host tensor inside the step;
- an optimiser that keeps its step count on the device (Adam's ``capturable``; fused on CUDA) and its gradients
  where the capture put them (no ``zero_grad`` between replays: the graph overwrites them);
- whatever is created lazily on a first call (Adam's moments, cuBLAS workspaces, the scheduler's tables on the
  device) created before recording: the first :data:`WARMUP_STEPS` steps of a phase run eagerly (on a side stream,
  as torch asks), and they are real steps of the run, not extra ones.

A phase is a stretch of steps with the same trained set and learning rates: Break-A-Scene's token warm-up starts a
second phase (:meth:`StepGraph.reset`), which warms up and records again.

Transfer and generation record their denoising steps the same way (``clic transfer / generate --cuda-graphs
capture``: :class:`clic.transfer.StaticTransferStep`, :func:`clic.sampling.denoise_captured`): one :class:`StepGraph`
per kind of step (guided or not, blended or not; a generation stage), the step index and the step's noise copied in,
DDIM's update gathered from device tables by the index (:class:`clic.sampling.DeviceDDIM`).

Without a GPU the same control flow runs with :class:`EagerGraph`, an honest stand-in: "recording" keeps the step
function and a replay calls it, so the CPU tests run every step of the static-buffer step, count the captures, and
check (on the meta device) that the recorded step neither reads a device value nor copies from the host.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

#: eager steps of a phase before it is recorded
WARMUP_STEPS = 2


class EagerGraph:
    """The stand-in for a CUDA graph where there is none: :meth:`capture` keeps the function, :meth:`replay` runs
    it. A recorded backward writes the gradients the recording made (they were dropped before it) instead of adding
    to them; the stand-in does the same by dropping them before each replay (``before``)."""

    def capture(self, fn: Callable[[], None], before: Callable[[], None]) -> None:
        self.fn, self.before = fn, before

    def replay(self) -> None:
        self.before()
        self.fn()


class CudaGraph:
    """``torch.cuda.CUDAGraph``: :meth:`capture` records ``fn``'s kernels (running none), :meth:`replay` runs them."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], None], before: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


def on_side_stream(fn: Callable[[], None], device: torch.device) -> None:
    """Run ``fn`` eagerly; on CUDA on a side stream (torch's rule for the warm-up before a capture)."""
    if device.type != "cuda":
        fn()
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


class StepGraph:
    """Runs a step function once a step: eagerly for the first ``warmup`` steps of a phase, then recorded once and
    replayed. ``before`` runs before each eager step and before the recording (e.g. dropping the gradients, so the
    recorded backward writes fresh ones instead of adding to old ones); never between replays.

    ``captures`` counts the recordings, ``eager_steps`` the warm-up steps, ``capture_s`` the host seconds spent
    recording (for the benchmarks)."""

    def __init__(self, device, warmup: int = WARMUP_STEPS):
        self.device = torch.device(device)
        self.warmup = warmup
        self.graph: CudaGraph | EagerGraph | None = None
        self.left = warmup
        self.captures = self.eager_steps = 0
        self.capture_s = 0.0

    def make_graph(self) -> CudaGraph | EagerGraph:
        return CudaGraph() if self.device.type == "cuda" else EagerGraph()

    def reset(self) -> None:
        """A new phase: the next steps warm up and record again."""
        self.graph, self.left = None, self.warmup

    def __call__(self, fn: Callable[[], None], before: Callable[[], None]) -> None:
        if self.graph is None and self.left > 0:
            self.left -= 1
            self.eager_steps += 1
            before()
            on_side_stream(fn, self.device)
            return
        if self.graph is None:
            before()
            t0 = time.perf_counter()
            graph = self.make_graph()
            graph.capture(fn, before)
            self.graph = graph
            self.captures += 1
            self.capture_s += time.perf_counter() - t0
        self.graph.replay()

    def close(self) -> None:
        """Drop the graph (and its memory pool)."""
        self.graph = None
