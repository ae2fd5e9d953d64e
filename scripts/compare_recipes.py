"""Learn with two recipes on the same random draws and print their loss terms side by side.

The first recipe's draws (timesteps, noise, flips, and the official recipe's RoI prompts and posterior samples) are
recorded and replayed into the second (:mod:`clic.draws`), so the two runs differ only in what the recipes compute.
``--draws FILE`` replays draws recorded elsewhere into both (e.g. by another implementation, under the names
:mod:`clic.draws` lists); ``--save-draws FILE`` writes the draws for another program to replay. Each recipe reads
the image and mask its own way (``image_fit``, ``binary_masks``).

    python scripts/compare_recipes.py --model src/clic/assets/toymodel --object-class chair \\
        --image src/clic/assets/examples/chair.png --mask src/clic/assets/examples/chair_mask.png --steps 1

The first recipe should be the one that draws more (``official``, the default): the second only replays.
"""

from __future__ import annotations

import argparse
import sys

from clic.cli.options import load_sources
from clic.config import learn_config
from clic.draws import RecordedDraws, ReplayedDraws, SeededDraws
from clic.learn import learn
from clic.models import load_backbone

TERMS = ("loss", "l_con", "l_att", "l_roi")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local diffusers folder or hub id")
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--object-class", default="object")
    p.add_argument("--recipes", nargs=2, default=("official", "paper"), metavar=("FIRST", "SECOND"))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", default=None, help="replay these recorded draws (safetensors) into both runs")
    p.add_argument("--save-draws", default=None, help="write the draws of the runs to this safetensors file")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    backbone = load_backbone(args.model, device=args.device)
    first = ReplayedDraws.load(args.draws) if args.draws else RecordedDraws(SeededDraws(args.seed))
    histories = {}
    for k, recipe in enumerate(args.recipes):
        cfg = learn_config(recipe, steps=args.steps, seed=args.seed, object_class=args.object_class,
                           checkpoint_every=0)
        threshold = cfg.mask_threshold if cfg.binary_masks else None
        images, masks = load_sources([(args.image, [args.mask])], backbone.resolution, threshold, cfg.image_fit)
        draws = first if k == 0 else ReplayedDraws(first.record)
        histories[recipe] = learn(backbone, images, masks, cfg, draws=draws, progress=False).history
    if args.save_draws and isinstance(first, RecordedDraws):
        first.save(args.save_draws)

    print(f"{'step':>4} {'t':>4}  {'recipe':<10} " + " ".join(f"{term:>10}" for term in TERMS))
    for step in range(args.steps):
        for recipe in args.recipes:
            record = histories[recipe][step]
            print(f"{record['step']:>4} {record['t']:>4}  {recipe:<10} "
                  + " ".join(f"{record[term]:>10.6f}" for term in TERMS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
