"""``clic ui``: the web page (:mod:`clic.ui`) on this machine."""

from __future__ import annotations

import importlib.util

from ..errors import ClicError, InputError
from ..ui import Workbench, launch


def register(sub, argv) -> None:
    p = sub.add_parser(
        "ui", help="a local web page: paint masks, learn, transfer and generate (needs the [ui] extra)",
        description="Starts a Gradio app on this machine. Runs on the bundled offline model unless --model is "
                    "given; jobs run one at a time.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--model", default=None, help="diffusers folder or hub id, e.g. CompVis/stable-diffusion-v1-4 "
                                                 "(default: the bundled offline model)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision of the frozen parts (default: fp32)")
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    p.set_defaults(func=run)


def run(args) -> None:
    if importlib.util.find_spec("gradio") is None:
        raise ClicError("the web UI needs gradio: pip install 'clic-diffusion[ui]'")
    if args.port is not None and not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    bench = Workbench(args.model, args.device, args.dtype)
    bench.load()
    launch(bench, args.host, args.port, args.share)
