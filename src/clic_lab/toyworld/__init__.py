"""Procedural toy world with exact ground truth for CLiC experiments.

- :mod:`clic_lab.toyworld.world`: seeded renderer of part-structured objects with
  local patterns (:func:`render_scene`, :func:`sample_scenes`, :class:`Scene`).
- :mod:`clic_lab.toyworld.detector`: small CNN saying which pattern fills a region
  (:class:`PatternDetector`; shipped weights in ``clic/assets``). Imported lazily
  because it needs torch.
- :mod:`clic_lab.toyworld.grid`: contact sheets for eyeballing scenes and masks.

See ``README.md`` in this folder.
"""

from .world import (
    CLASSES,
    COLOURS,
    HELD_OUT_COMBOS,
    HELD_OUT_PATTERNS,
    LAYOUTS,
    LINE_PATTERNS,
    MOTIFS,
    NATIVE_SIZE,
    PATTERN_ADJECTIVES,
    PATTERNABLE_PARTS,
    PATTERNS,
    SPLITS,
    TRAIN_PATTERNS,
    Scene,
    allowed_pairs,
    is_heldout,
    pattern_field,
    pattern_parts,
    render_scene,
    sample_scenes,
    scene_seeds,
)

# Imported on first use: the detector needs torch, and keeping grid out of the
# eager imports lets ``python -m clic_lab.toyworld.grid`` run without a warning.
_LAZY = {
    "PatternDetector": "detector",
    "train_detector": "detector",
    "evaluate_detector": "detector",
    "region_window": "detector",
    "LABELS": "detector",
    "DEFAULT_WEIGHTS": "detector",
    "contact_sheet": "grid",
    "part_mask_image": "grid",
    "write_contact_sheet": "grid",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLASSES",
    "COLOURS",
    "HELD_OUT_COMBOS",
    "HELD_OUT_PATTERNS",
    "LAYOUTS",
    "LINE_PATTERNS",
    "MOTIFS",
    "NATIVE_SIZE",
    "PATTERN_ADJECTIVES",
    "PATTERNABLE_PARTS",
    "PATTERNS",
    "SPLITS",
    "TRAIN_PATTERNS",
    "Scene",
    "allowed_pairs",
    "is_heldout",
    "pattern_field",
    "pattern_parts",
    "render_scene",
    "sample_scenes",
    "scene_seeds",
    *sorted(_LAZY),
]
