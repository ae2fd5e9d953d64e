"""Which SDXL cross-attention layers should form CA(v*, x_t) in l_att: a measured comparison on tiny-sdxl.

SDXL has cross-attention at two levels of its up (decoder) blocks: latent / 4 (32x32 at 1024 px, three transformers
of depth 10: 30 layers) and latent / 2 (64x64, three of depth 2: 6 layers); tiny-sdxl has the same two levels
(4x4 and 8x8 of its 16x16 latent; 4 and 2 layers). Each choice of layers learns v* on one image (paper losses), and
then v*'s maps are read on the source at a few timesteps, at each level apart and over all up layers: the share of
the map's mass inside M_s (M_s covers 0.28 of the image: the share of a flat map). Time per learning step on the
machine at hand too.

    PYTHONPATH=src python scripts/sdxl_attention_levels.py [--steps 60] [--lr 1e-2] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from clic.attention import capture_token_maps, cross_attention_layers
from clic.builder import make_model
from clic.concept import Concept, applied_concept
from clic.config import learn_config
from clic.imaging import resize_mask
from clic.learn import learn
from clic.models import load_backbone
from clic.tokens import initializer_embedding, token_positions

#: the choices compared: (name, attn_blocks, attn_factor)
CHOICES = (("up, both levels (paper's rule)", ("up",), None),
           ("up, latent/2 only (finest)", ("up",), 2),
           ("up, latent/4 only", ("up",), 4),
           ("down + mid + up", ("down", "mid", "up"), None))
READOUTS = (("latent/2", 2), ("latent/4", 4), ("all up", None))
PROMPT = "a chair with <v*> style"          # the context prompt of learning


def source(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Red and white stripes in a tall box on a smooth background (as tests/test_roi.py), and the box as M_s."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([0.1 * xx, 0.1 * yy, 0.05 * (xx + yy)]) + 0.02 * torch.randn(3, size, size, generator=g)
    mask = torch.zeros(1, size, size)
    mask[:, size // 8: 7 * size // 8, size // 16: 7 * size // 16] = 1
    stripes = ((torch.arange(size) // 3) % 2).float().expand(size, size)
    pattern = torch.stack([torch.full((size, size), 0.9), -0.8 + 1.6 * stripes, -0.8 + 1.6 * stripes])
    return torch.where(mask.bool(), pattern, image), mask


@torch.no_grad()
def mass_inside(backbone, concept, prompt, image, mask, factor, timesteps=(200, 400, 600)) -> float:
    """The share of CA(v*, x_t)'s mass inside M_s, on the up layers at ``factor`` (None: all), mean over timesteps
    (the same noise for every concept)."""
    layers = cross_attention_layers(backbone.unet, ("up",), factor)
    scheduler = backbone.training_scheduler()
    with applied_concept(backbone, concept) as applied:
        latents = backbone.encode_image(image[None])
        hw = tuple(latents.shape[-2:])
        ids = backbone.tokenize(prompt)
        pos = token_positions(ids, applied.token_ids[:1], prompt)
        text = backbone.encode_text(ids).to(backbone.unet.dtype)
        m = resize_mask(mask[None], hw)[0, 0]
        g = torch.Generator().manual_seed(0)
        shares = []
        for t in timesteps:
            x_t = scheduler.add_noise(latents, torch.randn(latents.shape, generator=g), torch.tensor([t]))
            with capture_token_maps(backbone.unet, pos, layers, hw) as capture:
                backbone.unet(x_t, torch.tensor([t]), **text.unet_kwargs())
            ca = capture.maps()[0, 0]
            shares.append(float((ca * m).sum() / ca.sum()))
    return statistics.mean(shares)


def row(backbone, image, mask, args, blocks, factor) -> tuple[list[str], float | None]:
    """The table cells of one choice of l_att layers (``blocks`` None: the untrained concept), and its step time."""
    shares, times = {r: [] for r, _ in READOUTS}, []
    for seed in args.seeds:
        if blocks is None:
            concept = Concept.untrained(["<v*>"], initializer_embedding(backbone, "pattern")[None])
        else:
            cfg = learn_config(steps=args.steps, lr=args.lr, seed=seed, object_class="chair", attn_blocks=blocks,
                               attn_factor=factor, flip_p=args.flip_p, checkpoint_every=0)
            t0 = time.perf_counter()
            concept = learn(backbone, [image], [mask], cfg, progress=False).concept
            times.append((time.perf_counter() - t0) / cfg.steps)
        for readout, f in READOUTS:
            shares[readout].append(mass_inside(backbone, concept, PROMPT, image, mask, f))
    cells = [f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in shares.values()]
    return cells, statistics.mean(times) if times else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2, help="a random tiny model needs more than the paper's 1e-5 to "
                                                          "move in a few steps")
    p.add_argument("--flip-p", type=float, default=0.0,
                   help="flips in learning (paper recipe: 0.5); off by default: the maps are read on the unflipped "
                        "source, and a random model's maps barely follow flipped content")
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_backbone(str(make_model("tiny-sdxl", f"{tmp}/tiny-sdxl")), device="cpu")
        image, mask = source(backbone.resolution)
        print(f"tiny-sdxl, {args.steps} steps at lr {args.lr}, flip_p {args.flip_p}, seeds {list(args.seeds)}; "
              "M_s covers "
              f"{float(mask.mean()):.3f} of the image (a flat map's share)\n")
        print("| l_att layers | layers | " + " | ".join(f"share inside M_s, read on {r}" for r, _ in READOUTS)
              + " | step |")
        print("|" + " --- |" * (len(READOUTS) + 3))
        cells, _ = row(backbone, image, mask, args, None, None)
        print("| before learning (the initializer, base K/V) | - | " + " | ".join(cells) + " | |", flush=True)
        for name, blocks, factor in CHOICES:
            cells, step = row(backbone, image, mask, args, blocks, factor)
            n_layers = len(cross_attention_layers(backbone.unet, blocks, factor))
            print(f"| {name} | {n_layers} | " + " | ".join(cells) + f" | {step * 1e3:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
