"""Tests of the procedural toy world and its shipped pattern detector."""

import numpy as np
import pytest

from clic_lab.toyworld import (
    CLASSES,
    COLOURS,
    HELD_OUT_COMBOS,
    HELD_OUT_PATTERNS,
    PATTERN_ADJECTIVES,
    PATTERNABLE_PARTS,
    PATTERNS,
    contact_sheet,
    render_scene,
    sample_scenes,
)


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    out = m.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out &= p[1 + dy : 1 + dy + m.shape[0], 1 + dx : 1 + dx + m.shape[1]]
    return out


def _dilate(m: np.ndarray) -> np.ndarray:
    return ~_erode(~m)


def test_vocabulary():
    assert len(PATTERNS) >= 10 and len(set(PATTERNS)) == len(PATTERNS)
    assert len(CLASSES) >= 5
    for cls in ("chair", "house", "vase", "lamp", "table"):
        assert cls in CLASSES
    assert len(HELD_OUT_PATTERNS) >= 3 and set(HELD_OUT_PATTERNS) <= set(PATTERNS)
    for cls, part in HELD_OUT_COMBOS:
        assert part in PATTERNABLE_PARTS[cls]
        # every class keeps at least one part that is patterned in training
        assert set(PATTERNABLE_PARTS[cls]) - {p for c, p in HELD_OUT_COMBOS if c == cls}
    assert set(PATTERN_ADJECTIVES) == set(PATTERNS)


def test_held_out_patterns_are_new_combinations_of_trained_parts():
    """Each held-out pattern is a trained motif on the lattice that motif never has in training: both its motif and
    its layout occur in the training split, the combination and the layout word never do."""
    from clic_lab.toyworld import LAYOUTS, MOTIFS, TRAIN_PATTERNS, pattern_parts

    assert len(HELD_OUT_PATTERNS) == len(MOTIFS) and not set(HELD_OUT_PATTERNS) & set(TRAIN_PATTERNS)
    trained_layouts = {MOTIFS[m] for m in MOTIFS}
    assert trained_layouts == set(LAYOUTS)
    for pat in HELD_OUT_PATTERNS:
        motif, layout = pattern_parts(pat)
        assert motif in TRAIN_PATTERNS and layout != MOTIFS[motif] and layout in trained_layouts
    captions = " ".join(sc.caption for sc in sample_scenes(300, seed=4, split="train", size=32))
    assert not any(word in captions for word in LAYOUTS)
    for sc in sample_scenes(300, seed=4, split="train", size=32):
        assert sc.pattern is None or sc.pattern in TRAIN_PATTERNS


def test_layouts_by_their_definition():
    """grid: the field repeats every period in u and in v; staggered: a row down is the same row shifted by half a
    period (so one row down is not the same field, two rows down are)."""
    from clic_lab.toyworld import MOTIFS, pattern_field

    p = 10.0
    u, v = np.meshgrid(np.linspace(0.13, 40.13, 97), np.linspace(0.29, 40.29, 89))
    for motif, layout in MOTIFS.items():
        grid, stag = f"{motif}-grid" if layout == "staggered" else motif, f"{motif}-staggered" if layout == "grid" else motif
        g = pattern_field(grid, u, v, p)
        assert np.array_equal(g, pattern_field(grid, u + p, v, p)) and np.array_equal(g, pattern_field(grid, u, v + p, p))
        s = pattern_field(stag, u, v, p)
        assert np.array_equal(s, pattern_field(stag, u + p / 2, v + p, p))
        assert np.array_equal(s, pattern_field(stag, u, v + 2 * p, p))
        assert not np.array_equal(s, pattern_field(stag, u, v + p, p))
        assert 0.1 < g.mean() < 0.6 and abs(g.mean() - s.mean()) < 0.05   # one motif per cell either way


def test_deterministic_per_seed():
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    for f in ("image", "object_mask", "pattern_label", "background"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert a.caption == b.caption
    assert all(np.array_equal(a.part_masks[k], b.part_masks[k]) for k in a.part_masks)
    assert not np.array_equal(a.image, c.image)
    s1, s2 = sample_scenes(3, seed=1), sample_scenes(3, seed=1)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(s1, s2))
    assert len({x.seed for x in s1}) == 3


def test_pattern_argument_keeps_object():
    """Same seed and class: the plain and patterned renders differ only on the part."""
    plain = render_scene(11, object_class="chair", pattern="none")
    pat = render_scene(11, object_class="chair", pattern="stripes", part="back")
    assert plain.pattern is None and pat.pattern == "stripes"
    assert np.array_equal(plain.object_mask, pat.object_mask)
    diff = np.any(plain.image != pat.image, axis=-1)
    # (antialiased edge pixels just outside the part mask may change too)
    assert diff.any() and not (diff & ~_dilate(pat.part_masks["back"])).any()


@pytest.mark.parametrize("size", [64, 128])
def test_masks_match_render(size):
    for sc in sample_scenes(40, seed=3, size=size):
        img, bg = sc.image.astype(int), sc.background.astype(int)
        assert img.shape == (size, size, 3) and sc.object_mask.shape == (size, size)
        assert set(sc.part_masks) == set(CLASSES[sc.object_class])
        # part masks are disjoint and cover the object mask
        stack = np.stack(list(sc.part_masks.values()))
        assert stack.sum(0).max() <= 1
        assert np.array_equal(stack.any(0), sc.object_mask)
        # away from the object the image is the background (edge pixels are blends;
        # a sharp corner may put a sliver of < half a pixel one pixel further out)
        away = np.abs(img - bg).max(-1)[~_dilate(sc.object_mask)]
        assert (away > 0).sum() <= 3 and away.max() < 64
        # object pixels stand out from the background (blends of two colours can
        # land near it: part/part edges, pattern/base edges inside the patterned part)
        d = np.abs(img - bg).max(-1)
        plain = sc.object_mask & (sc.pattern_label < 0)
        assert (d[plain] > 20).mean() > 0.98, sc.seed
        assert (d[sc.object_mask] > 20).mean() > 0.9, sc.seed
        for name, m in sc.part_masks.items():
            assert m.any(), (sc.seed, name)
            inner = _erode(m)
            if name != sc.part and inner.any():
                # a plain part's interior is exactly its colour
                assert np.abs(img[inner] - np.array(sc.params["part_colours"][name])).max() <= 1
        # pattern label is set exactly on the patterned part
        if sc.pattern is None:
            assert (sc.pattern_label == -1).all()
        else:
            pm = sc.part_masks[sc.part]
            assert np.array_equal(sc.pattern_label >= 0, pm)
            assert (sc.pattern_label[pm] == PATTERNS.index(sc.pattern)).all()
            cols = img[_erode(pm)]
            base = np.array(sc.params["part_colours"][sc.part])
            far = np.abs(cols - base).max(-1) > 40
            # two distinct colours: the part colour and the pattern colour
            assert 0.05 < far.mean() < 0.95, (sc.seed, sc.pattern, far.mean())


def test_captions():
    for sc in sample_scenes(40, seed=5):
        cap = sc.caption
        assert sc.object_class in cap and sc.colour in cap and sc.colour in COLOURS
        if sc.pattern is not None:
            assert PATTERN_ADJECTIVES[sc.pattern] in cap and sc.part in cap
            assert sc.pattern_colour in sc.caption_detailed
        else:
            assert " with " not in cap
    assert render_scene(0, object_class="chair", pattern="stripes", part="back", colour="red").caption == "a red chair with a striped back"


def test_splits():
    n_pat = 0
    for sc in sample_scenes(300, seed=9, split="train"):
        assert sc.pattern not in HELD_OUT_PATTERNS
        assert (sc.object_class, sc.part) not in HELD_OUT_COMBOS
        n_pat += sc.pattern is not None
    assert n_pat > 150
    for sc in sample_scenes(60, seed=9, split="heldout"):
        assert sc.pattern is not None
        assert sc.pattern in HELD_OUT_PATTERNS or (sc.object_class, sc.part) in HELD_OUT_COMBOS
    with pytest.raises(ValueError):
        render_scene(0, pattern=HELD_OUT_PATTERNS[0], split="train")
    with pytest.raises(ValueError):
        render_scene(0, object_class="chair", part="seat", split="train")
    with pytest.raises(ValueError):
        render_scene(0, object_class="chair", part="legs")


def test_every_pattern_and_class_renders():
    for i, pat in enumerate(PATTERNS):
        sc = render_scene(100 + i, pattern=pat)
        assert sc.pattern == pat and sc.pattern_label.max() == i
    for cls in CLASSES:
        assert render_scene(5, object_class=cls).object_class == cls


def test_contact_sheet(tmp_path):
    from clic_lab.toyworld import write_contact_sheet

    sheet = contact_sheet(sample_scenes(6, seed=2), cols=3, zoom=2)
    assert sheet.size[0] > 0 and sheet.size[1] > 0
    path = write_contact_sheet(str(tmp_path / "sheet.png"), n=4, seed=0)
    assert (tmp_path / "sheet.png").exists() and path.endswith("sheet.png")


def test_shipped_detector_classifies_fresh_renders():
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from clic_lab.toyworld.detector import DEFAULT_WEIGHTS, LABELS, PatternDetector

    assert DEFAULT_WEIGHTS.exists() and DEFAULT_WEIGHTS.stat().st_size < 2_000_000
    det = PatternDetector.load()
    images, masks, truth = [], [], []
    for i, sc in enumerate(sample_scenes(40, seed=424242, split="any", pattern=None, pattern_prob=0.85)):
        if sc.pattern is not None:
            images.append(sc.image)
            masks.append(sc.part_masks[sc.part])
            truth.append(sc.pattern)
        else:
            part = PATTERNABLE_PARTS[sc.object_class][0]
            images.append(sc.image)
            masks.append(sc.part_masks[part])
            truth.append("none")
    pred = det.predict_batch(images, masks)
    acc = np.mean([p == t for p, t in zip(pred, truth)])
    assert acc >= 0.9, list(zip(pred, truth))
    label, probs = det.predict(images[0], masks[0])
    assert label in LABELS and probs.shape == (len(LABELS),) and abs(probs.sum() - 1) < 1e-4
    # larger renders are handled at the detector's scale
    sc = render_scene(77, size=128, pattern="checker")
    assert det.predict(sc.image, sc.part_masks[sc.part])[0] == "checker"
