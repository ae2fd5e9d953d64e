"""``clic benchmark``: the comparison of methods and ablations listed in a manifest (:mod:`clic_lab.compare`)."""

from __future__ import annotations

from clic_lab.compare import run_benchmark

from .options import add_device_option
from .validate import input_file, output_folder


def register(sub, argv) -> None:
    p = sub.add_parser(
        "benchmark", help="run the comparison of methods and ablations listed in a manifest (cached, shardable)",
        description="Learns and transfers every (case, method) of MANIFEST (YAML or JSON; see clic_lab.compare), "
                    "caching concepts and results under OUT/cache, then writes OUT/results.csv, costs.csv, "
                    "results.md and grid.png. Shard with `accelerate launch --multi_gpu --num_processes N -m clic "
                    "benchmark ...` (CPU: `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m clic benchmark ...`).")
    p.add_argument("manifest", help="the manifest (.yaml, .yml or .json)")
    p.add_argument("--out", required=True, help="output folder (reused: cached runs are not recomputed)")
    add_device_option(p, "device of every process (default: accelerate's per process)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="overrides the manifest's dtype")
    p.add_argument("--merge-only", action="store_true", help="only score the cached results and write the outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> None:
    input_file(args.manifest, "manifest")
    output_folder(args.out)     # reused by every process of a sharded run, and by reruns: not locked
    report = run_benchmark(args.manifest, args.out, args.device, args.dtype, progress=not args.quiet,
                           merge_only=args.merge_only)
    if report is not None:
        print("\n".join(str(p) for p in (report.results_csv, report.costs_csv, report.table, report.grid)))
