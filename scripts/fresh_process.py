#!/usr/bin/env python
"""One fresh process timed as a user feels it: import, model load from a local folder, learning to the saved
concept (every warm-up, capture or compile included), then a guided transfer; writes JSON.

    clic make-model sd14-random /tmp/sd14 --dtype bf16            # once, in another process
    python scripts/fresh_process.py --model /tmp/sd14 --device cuda --dtype bf16 --steps 500 \\
        --cuda-graphs capture --transfer --json fresh.json

What it reports (seconds unless named otherwise):

- ``import``: torch, then clic's learning and transfer modules;
- ``load``: ``clic.models.load_backbone`` split into its parts (tokenizer, text encoder, VAE, UNet: reading and
  building each on the CPU in the dtype; ``to_device``: moving them to the device), and, measured after the run
  with the files in the page cache, ``read_safetensors_warm_s``: reading the weight files alone (the reading share
  of the parts);
- ``learning``: ``to_first_step_s`` from the start of the load to the start of the first learning step (the load
  plus the sources' encoding and the optimiser), ``first_step_s`` (the first step to its loss read back),
  ``capture_s`` (the host's time recording the step's CUDA graph, ``--cuda-graphs capture``), ``steady_step_s``
  (the step time over the reads after the first replays), ``wall_s``: from the first step's start to the saved
  concept, every step, warm-up, capture or compile and the save included; ``save_s``; the first and last loss;
- ``transfer``: the first guided transfer of the process (``--transfer-steps`` DDIM steps, the first
  ``--guided`` guided) and a second one; under ``--cuda-graphs capture`` both run the captured denoising loop
  (``clic.transfer.StaticTransferStep``: guided and unguided steps, each kind recorded as a CUDA graph after two eager
  steps), with the host's recording time and the graphs' count of each, and then the plain loop once more on the
  same draws: its time and the largest difference of its final latents from the captured ones;
- the peak memory (GPU: ``max_memory_allocated``; CPU: the process's peak RSS).

Every number comes from one run in this process: start a new process for each configuration.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a local diffusers model folder (e.g. clic make-model sd14-random DIR)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=500, help="learning steps (default 500)")
    p.add_argument("--size", type=int, default=None, help="source image size in pixels (default: the model's)")
    p.add_argument("--cuda-graphs", default="auto", help="--cuda-graphs of the learning run (auto, on, off, capture)")
    p.add_argument("--sync-every", type=int, default=0, help="--sync-every of the learning run (0: the default)")
    p.add_argument("--transfer", action="store_true", help="also time a guided transfer after learning")
    p.add_argument("--transfer-steps", type=int, default=50)
    p.add_argument("--guided", type=int, default=30, help="guided steps of the transfer (the first ones)")
    p.add_argument("--json", default=None, help="write the result here (also printed)")
    args = p.parse_args(argv)
    if not (Path(args.model) / "model_index.json").is_file():
        p.error(f"--model {args.model}: not a diffusers model folder (no model_index.json)")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out: dict = {"argv": sys.argv[1:], "python_start_to_script_s": round(T_START - _process_start(), 3)}
    clock = time.perf_counter
    t0 = clock()
    import torch
    t1 = clock()
    import clic.learn
    import clic.transfer
    from clic.capture import StepGraph
    from clic.concept import Concept
    from clic.config import TransferConfig, learn_config
    from clic.models import load_backbone
    from clic.runs import reads_losses
    from clic.speed import sync_interval, with_cuda_graphs
    from clic.transfer import transfer
    t2 = clock()
    out["import"] = {"torch_s": round(t1 - t0, 3), "clic_s": round(t2 - t1, 3)}

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    parts: dict = {}
    t_load = clock()
    backbone = load_backbone(args.model, device=device, dtype=args.dtype, timings=parts)
    t_loaded = clock()
    out["load"] = {"total_s": round(t_loaded - t_load, 3), **{f"{k}_s": round(v, 3) for k, v in parts.items()}}

    # learning, instrumented from outside: the first step's start (its draws), the graphs, the save
    marks: dict = {}
    graphs: list = []
    draw = clic.learn.draw

    def timed_draw(*a, **kw):
        marks.setdefault("first_step", clock())
        return draw(*a, **kw)

    class Recorded(StepGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            graphs.append(self)

    save = Concept.save

    def timed_save(self, path):
        t = clock()
        save(self, path)
        marks["save_s"] = clock() - t

    clic.learn.draw, clic.learn.StepGraph, Concept.save = timed_draw, Recorded, timed_save
    reads: list[tuple[int, float]] = []
    losses: list[float] = []

    def on_step(step, record):
        losses.append(record["loss"])
        reads.append((step, clock()))

    size = args.size or backbone.resolution
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, size, size)
    mask[:, size // 8: size // 2, size // 4: 3 * size // 4] = 1
    cfg = learn_config(steps=args.steps, object_class="chair", checkpoint_every=0, cuda_graphs=args.cuda_graphs,
                       sync_every=args.sync_every)
    with tempfile.TemporaryDirectory() as tmp:
        concept_path = Path(tmp) / "concept.safetensors"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_learn = clock()
        result = clic.learn.learn(backbone, [image], [mask], cfg, out_path=concept_path, progress=False,
                                  callback=on_step)
        sync()
        t_end = clock()
    first = marks["first_step"]
    # the steps whose loss values were read back (a burst's records come together: the read is its last step's)
    every = sync_interval(with_cuda_graphs(cfg, device), device)
    burst_ends = [(s, t) for s, t in reads if reads_losses(s, 0, args.steps, every)]
    warm = (graphs[0].warmup if graphs else 0) + 1          # from the read of the first replay (capture), or step 1
    later = [(s, t) for s, t in burst_ends if s >= warm]
    steady = (later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0]) if len(later) > 1 else None
    out["learning"] = {
        "steps": args.steps, "size": size, "cuda_graphs": args.cuda_graphs,
        "to_first_step_s": round(first - t_load, 3), "prepare_s": round(first - t_loaded, 3),
        "first_step_s": round(reads[0][1] - first, 3),
        "capture_s": round(sum(gr.capture_s for gr in graphs), 3) if graphs else None,
        "captures": sum(gr.captures for gr in graphs) if graphs else None,
        "steady_step_s": round(steady, 4) if steady is not None else None,
        "wall_s": round(t_end - first, 3), "save_s": round(marks.get("save_s", 0.0), 3),
        "learn_call_s": round(t_end - t_learn, 3),
        "loss_first": losses[0], "loss_last": losses[-1], "final": result.history[-1],
    }
    out["peak_memory_gib"] = {"learning": _peak_gib(torch, device)}

    if args.transfer:
        # the capture process's transfers run the captured loop (its graphs counted and timed as learning's are)
        graphs_of = "capture" if args.cuda_graphs == "capture" else "off"
        tcfg = TransferConfig(steps=args.transfer_steps, t_start=0, guidance_range=(0, args.guided), eta=1.0,
                              cuda_graphs=graphs_of)
        recorded: list = []

        class RecordedTransfer(StepGraph):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                recorded.append(self)

        clic.transfer.StepGraph = RecordedTransfer

        def timed_transfer(cfg):
            recorded.clear()
            sync()
            t = clock()
            res = transfer(backbone, result.concept, image, mask, cfg, progress=False)
            sync()
            return res, round(clock() - t, 3), {"capture_s": round(sum(g.capture_s for g in recorded), 3),
                                               "captures": sum(g.captures for g in recorded)}

        first, first_s, first_graphs = timed_transfer(tcfg)
        _, second_s, second_graphs = timed_transfer(tcfg)
        out["transfer"] = {"steps": args.transfer_steps, "guided": args.guided, "cuda_graphs": graphs_of,
                           "first_s": first_s, "second_s": second_s}
        if graphs_of == "capture":
            plain, plain_s, _ = timed_transfer(dataclasses.replace(tcfg, cuda_graphs="off"))
            out["transfer"].update({
                "first_capture_s": first_graphs["capture_s"], "first_captures": first_graphs["captures"],
                "second_capture_s": second_graphs["capture_s"], "plain_s": plain_s,
                "latents_max_abs_diff_vs_plain": float((first.latents - plain.latents).abs().max()),
                "latents_max_abs": float(plain.latents.abs().max())})
        out["peak_memory_gib"]["with_transfer"] = _peak_gib(torch, device)

    from safetensors.torch import load_file
    t = clock()
    for f in sorted(Path(args.model).glob("*/*.safetensors")):
        load_file(str(f))
    out["load"]["read_safetensors_warm_s"] = round(clock() - t, 3)
    out["process_s"] = round(clock() - T_START, 3)
    out["environment"] = {"torch": torch.__version__, "device": _device_name(torch, device),
                          "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                          "machine": platform.machine(), "dtype": args.dtype, "model": str(args.model)}
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


def _process_start() -> float:
    """This process's start on the ``perf_counter`` clock (Linux: /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.perf_counter() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


def _peak_gib(torch, device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)      # kB on Linux


def _device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


if __name__ == "__main__":
    main()
