"""``clic evaluate``: preservation outside the target mask and concept fidelity of one result
(:mod:`clic_lab.compare.metrics`)."""

from __future__ import annotations

import json
import math

from clic_lab.compare.metrics import ImageEncoder, evaluate

from ..errors import InputError, ModelError
from ..imaging import image_size, load_image, load_mask
from .validate import SIZE_RANGE, size as check_size


def register(sub, argv) -> None:
    p = sub.add_parser(
        "evaluate", help="preservation (PSNR, SSIM, LPIPS) outside the target mask and concept fidelity of a result",
        description="Prints JSON: psnr and ssim of the result vs the target outside the mask, lpips when its weights "
                    "are on disk, and the concept fidelity (cosine similarity of the source region and the edited "
                    "region in an image encoder) when --source, --source-mask and --encoder are given.")
    p.add_argument("--result", required=True, help="the edited image")
    p.add_argument("--target", required=True, help="the target image before the edit")
    p.add_argument("--mask", required=True, help="the target mask M_tg (white = edited region)")
    p.add_argument("--source", default=None, help="the source image I_s (for concept fidelity)")
    p.add_argument("--source-mask", default=None, help="the source mask M_s (for concept fidelity)")
    p.add_argument("--encoder", default=None, help="image encoder for fidelity: a local transformers folder or hub "
                                                   "id of a CLIP (vision) or DINO/ViT model")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone")
    p.add_argument("--no-lpips", action="store_true", help="do not try LPIPS")
    p.add_argument("--size", type=int, default=None,
                   help=f"evaluate at this square size, {SIZE_RANGE[0]}..{SIZE_RANGE[1]} (default: the result's "
                        f"shorter side, at most {SIZE_RANGE[1]})")
    p.set_defaults(func=run)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def run(args) -> None:
    size = check_size(args.size, "--size") or min(min(image_size(args.result)), SIZE_RANGE[1])
    result = load_image(args.result, size)
    target = load_image(args.target, size)
    mask = load_mask(args.mask, size, image_size(args.target))
    source = source_mask = None
    if bool(args.source) != bool(args.source_mask):
        raise InputError("give --source and --source-mask together")
    if args.source:
        source = load_image(args.source, size)
        source_mask = load_mask(args.source_mask, size, image_size(args.source))
    encoder, load_note = None, None
    if args.encoder:
        try:
            encoder = ImageEncoder.load(args.encoder)
        except ModelError as exc:
            load_note = f"fidelity skipped: {exc}"
    out = evaluate(result, target, mask, source, source_mask, encoder, None, None if args.no_lpips else args.lpips_net)
    if load_note:
        out["notes"] = [n for n in out["notes"] if not n.startswith("fidelity")] + [load_note]
    print(json.dumps({k: _clean(v) for k, v in out.items()}, indent=2))
