"""``clic ui``: the web page (:mod:`clic.ui`) on this machine."""

from __future__ import annotations

import importlib.util

from ..errors import ClicError
from ..ui import Workbench, launch
from .options import add_device_option
from .validate import free_port


def register(sub, argv) -> None:
    p = sub.add_parser(
        "ui", help="a local web page: paint masks, learn, transfer and generate (needs the [ui] extra)",
        description="Starts a Gradio app on this machine. Runs on the bundled offline model unless --model is "
                    "given; jobs run one at a time.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--model", default=None, help="diffusers folder or hub id, e.g. CompVis/stable-diffusion-v1-4 "
                                                 "(default: the bundled offline model)")
    add_device_option(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision of the frozen parts (default: fp32)")
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    p.set_defaults(func=run)


def run(args) -> None:
    if importlib.util.find_spec("gradio") is None:
        raise ClicError("the web UI needs gradio: pip install 'clic-diffusion[ui]'")
    free_port(args.host, args.port)                     # before the model loads
    bench = Workbench(args.model, args.device, args.dtype)
    bench.load()
    try:
        launch(bench, args.host, args.port, args.share)
    except OSError as exc:                               # taken meanwhile, or an address this machine does not have
        raise ClicError(f"cannot serve on {args.host}:{args.port or 'the default port'} ({exc})") from exc
