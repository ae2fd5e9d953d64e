"""The markdown tables of a bench result (``clic bench --report bench.json``), in BENCHMARKS.md's layout."""

from __future__ import annotations


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
        graphs = {"on": " (CUDA graphs)", "capture": " (the step as one CUDA graph)"}.get(fast.get("cuda_graphs"), "")
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
