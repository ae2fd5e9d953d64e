"""Procedural toy world with exact ground truth for CLiC experiments.

- :mod:`clic.toyworld.world`: seeded renderer of part-structured objects with
  local patterns (:func:`render_scene`, :func:`sample_scenes`, :class:`Scene`).
- :mod:`clic.toyworld.detector`: small CNN saying which pattern fills a region
  (:class:`PatternDetector`; shipped weights in ``clic/assets``). Imported lazily
  because it needs torch.
- :mod:`clic.toyworld.grid`: contact sheets for eyeballing scenes and masks.

See ``README.md`` in this folder.
"""

from .world import (
    CLASSES,
    COLOURS,
    HELD_OUT_COMBOS,
    HELD_OUT_PATTERNS,
    PATTERN_ADJECTIVES,
    PATTERNABLE_PARTS,
    PATTERNS,
    SPLITS,
    TRAIN_PATTERNS,
    Scene,
    allowed_pairs,
    is_heldout,
    pattern_field,
    render_scene,
    sample_scenes,
    scene_seeds,
)
from .grid import contact_sheet, part_mask_image, write_contact_sheet

_LAZY = {"PatternDetector", "train_detector", "evaluate_detector", "region_window", "LABELS", "DEFAULT_WEIGHTS"}


def __getattr__(name):  # lazy import of the torch-based detector
    if name in _LAZY:
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLASSES",
    "COLOURS",
    "HELD_OUT_COMBOS",
    "HELD_OUT_PATTERNS",
    "PATTERN_ADJECTIVES",
    "PATTERNABLE_PARTS",
    "PATTERNS",
    "SPLITS",
    "TRAIN_PATTERNS",
    "Scene",
    "allowed_pairs",
    "is_heldout",
    "pattern_field",
    "render_scene",
    "sample_scenes",
    "scene_seeds",
    "contact_sheet",
    "part_mask_image",
    "write_contact_sheet",
    *sorted(_LAZY),
]
