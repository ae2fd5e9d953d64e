"""Procedural toy world of part-structured objects carrying local patterns.

Each scene is one object (chair, house, vase, lamp, table, mug) built from
named parts, drawn with a random shape, pose and colour on a random
background.  At most one part carries a pattern (stripes, dots, ...) drawn in
a second colour.  Because everything is procedural, the ground truth is
exact: the mask of every visible part, the object mask and a per-pixel
pattern label come with the image.

Rendering is done with Pillow polygons at ``supersample`` x resolution and
box-downsampled, so edges are antialiased.  Masks are computed from the same
supersampled part-id map: a pixel belongs to the label (background or part)
that covers most of its sub-pixels (ties go to the background, then to the
part drawn first), so masks are disjoint, their union is ``object_mask`` and
each mask pixel is at least 9/16 covered by the object.

Determinism: ``render_scene(seed, ...)`` draws class, shape, pose, colours,
background and pattern from independent random streams derived from
``seed``.  Hence for the same seed and object class, scenes rendered with
different ``pattern`` / ``part`` arguments (or ``pattern="none"``) share the
same object geometry, colours and background and differ only in the pattern:
they are exact before/after pairs for editing evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "PATTERNS",
    "PATTERN_ADJECTIVES",
    "CLASSES",
    "PATTERNABLE_PARTS",
    "HELD_OUT_PATTERNS",
    "HELD_OUT_COMBOS",
    "TRAIN_PATTERNS",
    "COLOURS",
    "SPLITS",
    "Scene",
    "render_scene",
    "sample_scenes",
    "is_heldout",
    "allowed_pairs",
    "pattern_field",
    "pattern_parts",
    "scene_seeds",
    "MOTIFS",
    "LAYOUTS",
    "LINE_PATTERNS",
    "NATIVE_SIZE",
]

# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

#: Motifs and the lattice each is drawn on in the training split (its *canonical layout*). A motif pattern is a
#: motif repeated on a square lattice, either aligned ("grid") or with every other row shifted by half a period
#: ("staggered"). Captions name the motif only ("a starry back"); the layout is never named.
MOTIFS: Dict[str, str] = {
    "dots": "grid",
    "rings": "staggered",
    "crosses": "grid",
    "stars": "staggered",
    "diamonds": "grid",
    "triangles": "staggered",
}
LAYOUTS: Tuple[str, ...] = ("grid", "staggered")

#: Patterns drawn with lines rather than motifs (no layout).
LINE_PATTERNS: Tuple[str, ...] = ("stripes", "checker", "zigzag", "waves")


def _other_layout(layout: str) -> str:
    return LAYOUTS[1 - LAYOUTS.index(layout)]


#: Held-out patterns: each motif on the lattice it never has in training (e.g. ``"stars-grid"``). The model has
#: drawn every motif and both layouts, never this combination, and no training caption can name it: a concept that
#: must be composed from the prior and carried by the learned token.
HELD_OUT_PATTERNS: Tuple[str, ...] = tuple(f"{m}-{_other_layout(lay)}" for m, lay in MOTIFS.items())

#: Pattern names; ``pattern_label`` values index into this tuple.
PATTERNS: Tuple[str, ...] = LINE_PATTERNS + tuple(MOTIFS) + HELD_OUT_PATTERNS

_MOTIF_ADJECTIVES = {"dots": "dotted", "rings": "ringed", "crosses": "crossed", "stars": "starry",
                     "diamonds": "diamond", "triangles": "triangle"}

#: Caption adjective of each pattern (plain English words). A held-out pattern's words ("staggered dotted") never
#: occur in a training caption: the layout word is unknown to the model, the motif word names the canonical layout.
PATTERN_ADJECTIVES: Dict[str, str] = {
    "stripes": "striped",
    "checker": "checkered",
    "zigzag": "zigzag",
    "waves": "wavy",
    **_MOTIF_ADJECTIVES,
    **{f"{m}-{_other_layout(lay)}": f"{_other_layout(lay)} {_MOTIF_ADJECTIVES[m]}" for m, lay in MOTIFS.items()},
}


def pattern_parts(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``(motif, layout)`` of a pattern name (``(None, None)`` for a line pattern)."""
    if name in LINE_PATTERNS:
        return None, None
    if name in MOTIFS:
        return name, MOTIFS[name]
    motif, _, layout = name.partition("-")
    if motif in MOTIFS and layout in LAYOUTS:
        return motif, layout
    raise ValueError(f"unknown pattern {name!r}")


#: Object classes and their parts, in drawing order (later parts occlude earlier ones).
CLASSES: Dict[str, Tuple[str, ...]] = {
    "chair": ("legs", "back", "seat"),
    "house": ("walls", "roof", "door", "windows"),
    "vase": ("base", "body", "neck"),
    "lamp": ("stem", "shade", "base"),
    "table": ("legs", "apron", "top"),
    "mug": ("handle", "body", "rim"),
}

#: Parts large enough to carry a pattern.
PATTERNABLE_PARTS: Dict[str, Tuple[str, ...]] = {
    "chair": ("back", "seat"),
    "house": ("walls", "roof", "door"),
    "vase": ("body", "neck"),
    "lamp": ("shade", "base"),
    "table": ("top", "apron"),
    "mug": ("body",),
}


#: (class, part) pairs that never carry a pattern in ``split="train"``.
HELD_OUT_COMBOS: Tuple[Tuple[str, str], ...] = (
    ("chair", "seat"),
    ("house", "door"),
    ("vase", "neck"),
    ("lamp", "base"),
    ("table", "apron"),
)

TRAIN_PATTERNS: Tuple[str, ...] = LINE_PATTERNS + tuple(MOTIFS)

SPLITS = ("train", "heldout", "any")

#: Named colours (caption vocabulary) -> RGB.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (200, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (240, 215, 40),
    "green": (45, 155, 55),
    "blue": (35, 75, 205),
    "purple": (125, 55, 170),
    "pink": (240, 135, 185),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (125, 125, 125),
    "teal": (25, 150, 150),
}

# Base pattern period in pixels at 64x64 (scaled with the image size: at the world's native 128x128 a motif period
# is 15 px, 3.75 cells of a factor-4 latent). Motif patterns share one period.
_PERIOD = {"stripes": 6.5, "checker": 9.0, "zigzag": 7.5, "waves": 7.5}
_MOTIF_PERIOD = 7.5

#: Native image side of the world (what the toy model is trained at).
NATIVE_SIZE = 128

_BG_GAP = 80.0  # min RGB distance between any background pixel and any object colour
_GLASS = [(170, 215, 245), (250, 235, 150), (55, 70, 95)]
_DOOR = ["brown", "black", "white", "red", "gray"]


# --------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------


@dataclass
class Scene:
    """One rendered scene with exact ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 render.
        background: ``(H, W, 3)`` uint8 render of the background alone.
        caption: e.g. ``"a red chair with a striped back"`` or ``"a red chair"``.
        caption_detailed: caption that also names the pattern colour,
            e.g. ``"a red chair with a white striped back"``.
        part_masks: part name -> ``(H, W)`` bool mask of where the part is visible.
        object_mask: ``(H, W)`` bool, union of the part masks.
        pattern_label: ``(H, W)`` int16, -1 where there is no pattern, else the
            index into :data:`PATTERNS` over the whole visible patterned part.
        object_class: class name (key of :data:`CLASSES`).
        colour: colour name of the object (key of :data:`COLOURS`).
        pattern: pattern name or ``None`` for a plain object.
        part: name of the patterned part or ``None``.
        pattern_colour: colour name of the pattern or ``None``.
        seed: the seed the scene was rendered from.
        split: the split it was drawn for.
        params: extra generation parameters (pose, pattern period, ...).
    """

    image: np.ndarray
    background: np.ndarray
    caption: str
    caption_detailed: str
    part_masks: Dict[str, np.ndarray]
    object_mask: np.ndarray
    pattern_label: np.ndarray
    object_class: str
    colour: str
    pattern: Optional[str]
    part: Optional[str]
    pattern_colour: Optional[str]
    seed: int
    split: str = "any"
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @property
    def pattern_mask(self) -> np.ndarray:
        """Bool mask of the patterned region (all False for a plain object)."""
        return self.pattern_label >= 0

    @property
    def pattern_index(self) -> int:
        """Index of the pattern in :data:`PATTERNS` or -1."""
        return PATTERNS.index(self.pattern) if self.pattern else -1


# --------------------------------------------------------------------------
# Split logic
# --------------------------------------------------------------------------


def is_heldout(object_class: str, part: Optional[str], pattern: Optional[str]) -> bool:
    """True when a (class, part, pattern) triple may not appear in the training split."""
    if pattern is None:
        return False
    return pattern in HELD_OUT_PATTERNS or (object_class, part) in HELD_OUT_COMBOS


def allowed_pairs(object_class: str, split: str) -> List[Tuple[str, str]]:
    """All (pattern, part) pairs that ``split`` allows on ``object_class``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pairs = [(pat, part) for part in PATTERNABLE_PARTS[object_class] for pat in PATTERNS]
    if split == "train":
        pairs = [pp for pp in pairs if not is_heldout(object_class, pp[1], pp[0])]
    elif split == "heldout":
        pairs = [pp for pp in pairs if is_heldout(object_class, pp[1], pp[0])]
    return pairs


# --------------------------------------------------------------------------
# Geometry helpers (object-local coordinates, y pointing down)
# --------------------------------------------------------------------------


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _trap(y0: float, hw0: float, y1: float, hw1: float, cx: float = 0.0) -> np.ndarray:
    """Trapezoid symmetric about x=cx, half-width hw0 at y0 and hw1 at y1."""
    return np.array([[cx - hw0, y0], [cx + hw0, y0], [cx + hw1, y1], [cx - hw1, y1]], dtype=np.float64)


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 2 * np.pi, n: int = 40) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * np.pi - 1e-9)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _profile(ys: np.ndarray, hws: np.ndarray) -> np.ndarray:
    """Polygon symmetric about x=0 from a half-width profile hw(y)."""
    right = np.stack([hws, ys], axis=1)
    left = np.stack([-hws[::-1], ys[::-1]], axis=1)
    return np.concatenate([right, left], axis=0)


Parts = List[Tuple[str, List[np.ndarray]]]


def _chair(rng: np.random.Generator) -> Parts:
    seat_w = rng.uniform(0.55, 0.8)
    inset = rng.uniform(0.06, 0.16) * seat_w
    seat_h = rng.uniform(0.45, 0.6)
    back_w = (seat_w - inset) * rng.uniform(0.8, 1.0)
    back_h = rng.uniform(0.85, 1.15)
    leg_len = rng.uniform(0.55, 0.85)
    leg_w = rng.uniform(0.06, 0.1)
    style = rng.integers(4)
    if style == 0:  # rectangle
        back = _rect(-back_w, -back_h, back_w, 0.1)
    elif style == 1:  # rounded top
        r = back_w
        arc = _ellipse(0.0, -back_h + r * 0.6, back_w, r * 0.6, np.pi, 2 * np.pi, 24)
        back = np.concatenate([arc, [[back_w, 0.1], [-back_w, 0.1]]], axis=0)
    elif style == 2:  # trapezoid, wider at top
        back = _trap(-back_h, back_w, 0.1, back_w * 0.8)
    else:  # notched top corners
        c = back_w * 0.25
        back = np.array(
            [[-back_w + c, -back_h], [back_w - c, -back_h], [back_w, -back_h + c], [back_w, 0.1], [-back_w, 0.1], [-back_w, -back_h + c]]
        )
    seat = _trap(0.0, seat_w - inset, seat_h, seat_w)
    y0 = seat_h - 0.05
    legs = [
        _rect(-seat_w, y0, -seat_w + 2 * leg_w, y0 + leg_len),
        _rect(seat_w - 2 * leg_w, y0, seat_w, y0 + leg_len),
    ]
    if rng.random() < 0.6:  # back legs, visible between the front ones
        bx = seat_w - inset - 2 * leg_w
        short = leg_len * 0.8
        legs += [_rect(-bx - 2 * leg_w * 0.8, y0, -bx, y0 + short), _rect(bx, y0, bx + 2 * leg_w * 0.8, y0 + short)]
    return [("legs", legs), ("back", [back]), ("seat", [seat])]


def _house(rng: np.random.Generator) -> Parts:
    ww = rng.uniform(0.65, 0.95)
    wh = rng.uniform(0.95, 1.3)
    walls = _rect(-ww, 0.0, ww, wh)
    over = rng.uniform(0.06, 0.2)
    rh = rng.uniform(0.6, 0.95)
    f = rng.uniform(0.06, 0.1)  # fascia: a short vertical edge at the eaves
    if rng.random() < 0.6:  # gable
        roof = np.array([[-ww - over, 0.06], [-ww - over, 0.06 - f], [0.0, -rh], [ww + over, 0.06 - f], [ww + over, 0.06]])
    else:  # hip roof (flat top)
        top = rng.uniform(0.2, 0.45) * ww
        roof = np.array([[-ww - over, 0.06], [-ww - over, 0.06 - f], [-top, -rh * 0.8], [top, -rh * 0.8], [ww + over, 0.06 - f], [ww + over, 0.06]])
    dw = rng.uniform(0.16, 0.24)
    dh = rng.uniform(0.5, 0.65) * wh
    s = rng.uniform(0.16, 0.22)  # window half size
    wy = rng.uniform(0.25, 0.38) * wh
    layout = rng.integers(3)
    if layout == 0:
        dx = 0.0
        wxs = [-ww * 0.55, ww * 0.55]
    elif layout == 1:
        dx = -ww * 0.45
        wxs = [ww * 0.45]
    else:
        dx = ww * 0.45
        wxs = [-ww * 0.45]
    door = _rect(dx - dw, wh - dh, dx + dw, wh)
    windows = [_rect(x - s, wy - s, x + s, wy + s) for x in wxs]
    return [("walls", [walls]), ("roof", [roof]), ("door", [door]), ("windows", windows)]


def _vase(rng: np.random.Generator) -> Parts:
    bw = rng.uniform(0.5, 0.75)  # body half-width
    nw = rng.uniform(0.2, 0.3)  # neck half-width
    base_h = rng.uniform(0.15, 0.25)
    base_w = rng.uniform(0.35, 0.55)
    body_top = rng.uniform(-0.45, -0.25)
    body_bot = 1.0 - base_h + 0.04
    a = rng.uniform(0.5, 0.9)
    skew = rng.uniform(-0.35, 0.35)
    t = np.linspace(0.0, 1.0, 33)
    hw = bw * np.sin(np.pi * np.clip(t + skew * t * (1 - t), 0, 1)) ** a
    hw = np.maximum(hw, np.where(t < 0.5, nw * 0.95, base_w * 0.7))
    body = _profile(body_top + t * (body_bot - body_top), hw)
    lip = nw * rng.uniform(1.1, 1.4)
    neck = np.array([[-lip, -1.0], [lip, -1.0], [nw, -0.88], [nw, body_top + 0.2], [-nw, body_top + 0.2], [-nw, -0.88]])
    base = _trap(1.0 - base_h, base_w * 0.8, 1.0, base_w)
    return [("base", [base]), ("body", [body]), ("neck", [neck])]


def _lamp(rng: np.random.Generator) -> Parts:
    sh = rng.uniform(0.65, 0.85)
    top_w = rng.uniform(0.25, 0.45)
    bot_w = rng.uniform(0.6, 0.85)
    if rng.random() < 0.7:
        shade = _trap(-1.0, top_w, -1.0 + sh, bot_w)
    else:  # dome shade
        arc = _ellipse(0.0, -1.0 + sh, bot_w, sh, np.pi, 2 * np.pi, 32)
        shade = arc
    base_h = rng.uniform(0.32, 0.45)
    base_w = rng.uniform(0.45, 0.65)
    stem_w = rng.uniform(0.04, 0.07)
    stem = _rect(-stem_w, -1.0 + sh - 0.1, stem_w, 1.0 - base_h + 0.05)
    if rng.random() < 0.5:
        base = np.concatenate([_ellipse(0.0, 1.0, base_w, base_h, np.pi, 2 * np.pi, 32), [[base_w, 1.0]]], axis=0)
    else:
        base = _trap(1.0 - base_h, base_w * rng.uniform(0.4, 0.7), 1.0, base_w)
    return [("stem", [stem]), ("shade", [shade]), ("base", [base])]


def _table(rng: np.random.Generator) -> Parts:
    tw = rng.uniform(0.95, 1.15)
    td = rng.uniform(0.5, 0.65)
    inset = rng.uniform(0.1, 0.2)
    et = rng.uniform(0.08, 0.12)
    top = [_trap(-td, tw - inset, 0.0, tw), _rect(-tw, 0.0, tw, et)]
    aw = tw * rng.uniform(0.82, 0.92)
    ah = rng.uniform(0.45, 0.58)
    apron = _rect(-aw, et, aw, et + ah)
    lw = rng.uniform(0.06, 0.1)
    ly = rng.uniform(0.9, 1.15)
    legs = [_rect(-aw, et + 0.02, -aw + 2 * lw, ly), _rect(aw - 2 * lw, et + 0.02, aw, ly)]
    if rng.random() < 0.5:
        bx = aw - inset * 0.8
        legs += [_rect(-bx + 2 * lw, et, -bx + 3.6 * lw, ly - 0.12), _rect(bx - 3.6 * lw, et, bx - 2 * lw, ly - 0.12)]
    return [("legs", legs), ("apron", [apron]), ("top", top)]


def _mug(rng: np.random.Generator) -> Parts:
    bw = rng.uniform(0.55, 0.75)
    bh = rng.uniform(0.8, 1.0)
    taper = rng.uniform(0.85, 1.0)
    body = _trap(-bh, bw, bh, bw * taper)
    rim_h = rng.uniform(0.1, 0.16)
    rim = _rect(-bw - 0.03, -bh - rim_h, bw + 0.03, -bh + 0.02)
    side = 1.0 if rng.random() < 0.5 else -1.0
    hr = rng.uniform(0.35, 0.5)
    cy = rng.uniform(-0.15, 0.15)
    thick = rng.uniform(0.09, 0.14)
    outer = _ellipse(side * bw, cy, hr, hr * 1.1, -np.pi / 2, np.pi / 2, 24)
    inner = _ellipse(side * bw, cy, hr - thick, (hr - thick) * 1.1, -np.pi / 2, np.pi / 2, 24)[::-1]
    handle = np.concatenate([outer, inner], axis=0)
    handle[:, 0] = side * bw + side * np.abs(handle[:, 0] - side * bw)
    return [("handle", [handle]), ("body", [body]), ("rim", [rim])]


_BUILDERS = {"chair": _chair, "house": _house, "vase": _vase, "lamp": _lamp, "table": _table, "mug": _mug}


# --------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _cell(u: np.ndarray, v: np.ndarray, p: float, stagger: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to the centre of the lattice cell of period p."""
    if stagger:
        row = np.floor(v / p)
        u = u + 0.5 * p * (row % 2)
    return (_frac(u / p) - 0.5) * p, (_frac(v / p) - 0.5) * p


def _motif(motif: str, du: np.ndarray, dv: np.ndarray, p: float) -> np.ndarray:
    """Boolean field of one motif centred in its lattice cell (``du, dv`` from the cell centre, period ``p``)."""
    if motif == "dots":
        return du * du + dv * dv < (0.27 * p) ** 2
    if motif == "rings":
        rho = np.hypot(du, dv)
        return (rho < 0.40 * p) & (rho > 0.2 * p)
    if motif == "crosses":
        a, b = 0.11 * p, 0.4 * p
        return ((np.abs(du) < a) & (np.abs(dv) < b)) | ((np.abs(dv) < a) & (np.abs(du) < b))
    if motif == "stars":
        rho = np.hypot(du, dv)
        ang = np.arctan2(du, -dv)  # tip pointing up
        sector = 2 * np.pi / 5
        t = np.abs(_frac(ang / sector) - 0.5) * 2.0  # 1 at the tips, 0 between
        r_out, r_in = 0.46 * p, 0.19 * p
        return rho < r_in + (r_out - r_in) * t**2
    if motif == "diamonds":
        return np.abs(du) + 0.8 * np.abs(dv) < 0.34 * p
    if motif == "triangles":  # pointing up
        top, bottom = -0.36 * p, 0.3 * p
        half = 0.4 * p * (dv - top) / (bottom - top)
        return (dv > top) & (dv < bottom) & (np.abs(du) < half)
    raise ValueError(f"unknown motif {motif!r}")


def pattern_field(name: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Boolean field of pattern ``name`` (True = pattern colour) in pattern coordinates."""
    if name == "stripes":
        return _frac(v / p) < 0.5
    if name == "checker":
        c = 0.5 * p
        return (np.floor(u / c) + np.floor(v / c)) % 2 == 0
    if name == "zigzag":
        tri = np.abs(_frac(u / p) - 0.5) * 2.0  # 0..1 triangle wave
        return _frac((v + 0.7 * p * tri) / p) < 0.45
    if name == "waves":
        return _frac((v + 0.25 * p * np.sin(2 * np.pi * u / (2.2 * p))) / p) < 0.45
    motif, layout = pattern_parts(name)
    du, dv = _cell(u, v, p, stagger=layout == "staggered")
    return _motif(motif, du, dv, p)


# --------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def _shade(c, f: float) -> Tuple[int, int, int]:
    c = np.asarray(c, dtype=np.float64)
    if f < 1.0 and c.max() < 70:  # darkening black does nothing visible: lighten instead
        out = c + (255 - c) * (1.0 - f) * 0.6
    else:
        out = c * f
    return tuple(int(x) for x in np.clip(np.round(out), 0, 255))


def _jitter(rng: np.random.Generator, c, amount: int = 10) -> Tuple[int, int, int]:
    c = np.asarray(c) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(x) for x in np.clip(c, 0, 255))


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _part_phrase(adjs: str, part: str) -> str:
    """'a striped back' / 'an argyle top' / 'striped walls' (plural parts take no article)."""
    return f"{adjs} {part}" if part.endswith("s") else f"{_a(adjs)} {adjs} {part}"


def _rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _choose_class(rng, object_class, part) -> str:
    if object_class is not None:
        if object_class not in CLASSES:
            raise ValueError(f"unknown object class {object_class!r}; choose from {tuple(CLASSES)}")
        return object_class
    names = list(CLASSES)
    if part is not None:
        names = [c for c in names if part in PATTERNABLE_PARTS[c]]
        if not names:
            raise ValueError(f"no class has a patternable part {part!r}")
    return names[int(rng.integers(len(names)))]


def render_scene(
    seed: int,
    size: int = NATIVE_SIZE,
    object_class: Optional[str] = None,
    pattern: Optional[str] = None,
    part: Optional[str] = None,
    split: str = "any",
    colour: Optional[str] = None,
    pattern_colour: Optional[str] = None,
    pattern_prob: float = 0.8,
    supersample: int = 4,
) -> Scene:
    """Render one scene, deterministically from ``seed``.

    Args:
        seed: any non-negative int; all randomness comes from it.
        size: image side in pixels (pattern periods scale with ``size / 64``).
        object_class: force the class (key of :data:`CLASSES`).
        pattern: force the pattern (name in :data:`PATTERNS`), or ``"none"`` for a
            plain object; ``None`` draws it (plain with prob. ``1 - pattern_prob``
            for splits "train" and "any"; "heldout" scenes are always patterned).
        part: force the patterned part (must be patternable for the class).
        split: "train" (never a held-out pattern or held-out (class, part)
            combination), "heldout" (always at least one of them) or "any".
        colour: force the object colour name (key of :data:`COLOURS`).
        pattern_colour: force the pattern colour name.
        pattern_prob: probability of a patterned object when drawing the pattern.
        supersample: rasterisation supersampling factor.

    Raises:
        ValueError: when the forced arguments contradict each other or ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if pattern is not None and pattern != "none" and pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}")
    if colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}")
    if pattern_colour is not None and pattern_colour not in COLOURS:
        raise ValueError(f"unknown colour {pattern_colour!r}")
    seed = int(seed)
    ss = np.random.SeedSequence(seed)
    r_class, r_shape, r_pose, r_col, r_bg, r_pat = [np.random.default_rng(s) for s in ss.spawn(6)]

    # ---- class and shape -------------------------------------------------
    cls = _choose_class(r_class, object_class, part)
    if part is not None and part not in PATTERNABLE_PARTS[cls]:
        raise ValueError(f"part {part!r} of {cls!r} cannot carry a pattern; choose from {PATTERNABLE_PARTS[cls]}")
    parts = _BUILDERS[cls](r_shape)
    names = [n for n, _ in parts]
    assert tuple(names) == CLASSES[cls]

    # ---- pattern and part choice ----------------------------------------
    if pattern == "none":
        if split == "heldout":
            raise ValueError('split="heldout" scenes always carry a pattern')
        if part is not None:
            raise ValueError('pattern="none" with a part makes no sense')
        pat, ppart = None, None
    else:
        pairs = allowed_pairs(cls, split)
        if pattern is not None:
            pairs = [pp for pp in pairs if pp[0] == pattern]
        if part is not None:
            pairs = [pp for pp in pairs if pp[1] == part]
        if not pairs:
            raise ValueError(f"pattern={pattern!r} on {cls}/{part} is not allowed in split {split!r}")
        patterned = split == "heldout" or pattern is not None or part is not None or r_pat.random() < pattern_prob
        if patterned:
            pat, ppart = pairs[int(r_pat.integers(len(pairs)))]
        else:
            pat, ppart = None, None

    # ---- pose --------------------------------------------------------------
    theta = np.deg2rad(r_pose.uniform(-10, 10))
    shear = r_pose.uniform(-0.12, 0.12)
    aspect = r_pose.uniform(0.9, 1.1)
    A = _rot(theta) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0 / aspect])
    pts = np.concatenate([poly for _, polys in parts for poly in polys], axis=0)
    tp = pts @ A.T
    lo, hi = tp.min(0), tp.max(0)
    extent = float((hi - lo).max())
    frac = r_pose.uniform(0.72, 0.9)
    scale = frac * size / extent
    margin = 0.04 * size
    room = size - 2 * margin - (hi - lo) * scale
    offset = margin + r_pose.uniform(0, 1, size=2) * np.maximum(room, 0) - lo * scale
    M = A * scale  # local -> pixel

    # ---- colours -----------------------------------------------------------
    cname = colour if colour is not None else list(COLOURS)[int(r_col.integers(len(COLOURS)))]
    base = _jitter(r_col, COLOURS[cname], 8)
    shades = {
        "legs": 0.75,
        "stem": 0.75,
        "seat": 0.9,
        "roof": 0.7,
        "top": 1.0,
        "apron": 0.85,
        "neck": 0.9,
        "base": 0.8,
        "rim": 0.85,
        "handle": 0.85,
    }
    part_col: Dict[str, Tuple[int, int, int]] = {}
    for n in names:
        part_col[n] = _shade(base, shades.get(n, 1.0))
    if cls == "house":
        walls = part_col["walls"]
        doors = [d for d in _DOOR if _dist(COLOURS[d], walls) > 90] or ["black"]
        part_col["door"] = _jitter(r_col, COLOURS[doors[int(r_col.integers(len(doors)))]], 6)
        glass = [g for g in _GLASS if _dist(g, walls) > 90] or [_GLASS[2]]
        part_col["windows"] = glass[int(r_col.integers(len(glass)))]

    # ---- background ------------------------------------------------------
    # Every background pixel keeps a colour distance > _BG_GAP from every part
    # colour (and the pattern colour is chosen likewise), so object pixels
    # always stand out from the background.
    obj_cols = np.array(list(part_col.values()), dtype=np.float64)
    bg_kind = ("plain", "gradient", "noise")[int(r_bg.integers(3))]
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)

    def min_dist(bg_img, cols):
        px = bg_img[::2, ::2].reshape(-1, 1, 3)
        return float(np.min(np.linalg.norm(px - np.asarray(cols, dtype=np.float64).reshape(1, -1, 3), axis=-1)))

    def make_bg(c0):
        if bg_kind == "gradient":
            c1 = np.clip(c0 + r_bg.normal(0, 50, size=3), 0, 255)
            ang = r_bg.uniform(0, 2 * np.pi)
            t = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) / np.sqrt(0.5) + 0.5
            t = np.clip(t, 0, 1)[..., None]
            return c0 * (1 - t) + c1 * t
        if bg_kind == "noise":
            coarse = r_bg.normal(0, 1, size=(size // 4 + 2, size // 4 + 2)).astype(np.float32)
            coarse = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float64)
            fine = r_bg.normal(0, 1, size=(size, size))
            return np.clip(c0 + (7.0 * coarse + 3.0 * fine)[..., None], 0, 255)
        return np.broadcast_to(c0, (size, size, 3)).astype(np.float64)

    bg = None
    for _ in range(100):
        mode = r_bg.integers(3)
        if mode == 0:
            c0 = r_bg.integers(175, 256, size=3)
        elif mode == 1:
            c0 = r_bg.integers(15, 90, size=3)
        else:
            c0 = r_bg.integers(0, 256, size=3)
        cand = make_bg(c0.astype(np.float64))
        if min_dist(cand, obj_cols) > _BG_GAP:
            bg = cand
            break
    if bg is None:  # fall back to the farthest of a few plain colours
        fallback = [(250, 250, 250), (8, 8, 8), (128, 128, 128), (240, 240, 110), (110, 200, 245), (200, 120, 240)]
        c0 = max(fallback, key=lambda c: np.min(np.linalg.norm(obj_cols - np.asarray(c, dtype=np.float64), axis=1)))
        bg = np.broadcast_to(np.asarray(c0, dtype=np.float64), (size, size, 3)).copy()
    bg_u8 = np.round(bg).astype(np.uint8)

    # ---- pattern colour and geometry ---------------------------------------
    pcol_name = None
    pcol = None
    period = None
    if pat is not None:
        pc = part_col[ppart]
        names_c = list(COLOURS)
        if pattern_colour is not None:
            pcol_name = pattern_colour
        else:
            good = [n for n in names_c if _dist(COLOURS[n], pc) > 110 and min_dist(bg, [COLOURS[n]]) > _BG_GAP]
            if not good:
                good = [n for n in names_c if _dist(COLOURS[n], pc) > 110] or names_c
            pcol_name = good[int(r_pat.integers(len(good)))]
        pcol = _jitter(r_pat, COLOURS[pcol_name], 6)
        period = _PERIOD.get(pat, _MOTIF_PERIOD) * r_pat.uniform(0.92, 1.12) * size / 64.0
        phase = r_pat.uniform(0, period * 4, size=2)
        flip = bool(r_pat.random() < 0.5)  # stripes vertical / diagonal direction

    # ---- raster ------------------------------------------------------------
    ss_ = int(supersample)
    H = size * ss_
    canvas = np.repeat(np.repeat(bg_u8, ss_, axis=0), ss_, axis=1)
    ids = np.zeros((H, H), dtype=np.uint8)
    for k, (n, polys) in enumerate(parts):
        img = Image.new("L", (H, H), 0)
        draw = ImageDraw.Draw(img)
        for poly in polys:
            pix = (poly @ M.T + offset) * ss_
            draw.polygon([tuple(p) for p in pix.tolist()], fill=1)
        m = np.asarray(img, dtype=bool)
        canvas[m] = part_col[n]
        if n == ppart:
            yy, xx = np.nonzero(m)
            # pattern coordinates: object frame (undo rotation), low-res pixel units
            x = (xx + 0.5) / ss_ - size / 2
            y = (yy + 0.5) / ss_ - size / 2
            R = _rot(-theta)
            u = R[0, 0] * x + R[0, 1] * y + phase[0]
            v = R[1, 0] * x + R[1, 1] * y + phase[1]
            if flip and pat == "stripes":
                u, v = v, u
            if flip and pat == "diagonal":
                u = -u
            f = pattern_field(pat, u, v, period)
            canvas[yy[f], xx[f]] = pcol
        ids[m] = k + 1

    if ss_ > 1:
        image = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BOX))
    else:
        image = canvas
    # per-pixel sub-sample counts of every label, then majority vote (ties -> lowest label)
    L = len(parts) + 1
    pix = (np.arange(H) // ss_)[:, None] * size + (np.arange(H) // ss_)[None, :]
    counts = np.bincount((pix * L + ids).ravel(), minlength=size * size * L).reshape(size, size, L)
    label = np.argmax(counts, axis=-1)
    part_masks = {n: label == k + 1 for k, n in enumerate(names)}
    object_mask = label > 0
    pattern_label = np.full((size, size), -1, dtype=np.int16)
    if pat is not None:
        pattern_label[part_masks[ppart]] = PATTERNS.index(pat)

    # ---- captions --------------------------------------------------------
    caption = f"{_a(cname)} {cname} {cls}"
    detailed = caption
    if pat is not None:
        adj = PATTERN_ADJECTIVES[pat]
        caption += f" with {_part_phrase(adj, ppart)}"
        detailed += f" with {_part_phrase(pcol_name + ' ' + adj, ppart)}"

    params = {
        "rotation_deg": float(np.rad2deg(theta)),
        "shear": float(shear),
        "scale": float(scale),
        "offset": tuple(float(x) for x in offset),
        "background": bg_kind,
        "part_colours": dict(part_col),
        "pattern_period": None if period is None else float(period),
    }
    return Scene(
        image=image,
        background=bg_u8,
        caption=caption,
        caption_detailed=detailed,
        part_masks=part_masks,
        object_mask=object_mask,
        pattern_label=pattern_label,
        object_class=cls,
        colour=cname,
        pattern=pat,
        part=ppart,
        pattern_colour=pcol_name,
        seed=seed,
        split=split,
        params=params,
    )


def scene_seeds(n: int, seed: int) -> List[int]:
    """The ``n`` per-scene seeds that :func:`sample_scenes` uses for ``seed``."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint64) >> np.uint64(1)]


def sample_scenes(n: int, seed: int = 0, **kwargs) -> List[Scene]:
    """Render ``n`` scenes with per-scene seeds derived from ``seed``.

    Keyword arguments are passed to :func:`render_scene` (``size``, ``split``,
    ``object_class``, ``pattern``, ...).
    """
    return [render_scene(s, **kwargs) for s in scene_seeds(n, seed)]
