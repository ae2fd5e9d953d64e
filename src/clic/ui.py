"""``clic ui``: the whole workflow in a local web page (Gradio).

    source panel   image + painted mask M_s, OBJECT, prompt P_s    -> Learn     -> concept file (kept, downloadable),
                                                                                  live plot of l_con, l_att, l_RoI
    target panel   image + painted (or found, sec. 3.3) mask M_tg  -> Transfer  -> each result beside its CA(v*)
    generate panel OBJECT, number of images, t_s                   -> Generate  -> images
    examples       the shipped images: a click fills both editors, masks included

The page is a thin shell. The jobs are the methods of :class:`Workbench`, which take numpy images and masks (what
the page's editors hand over, see :func:`editor_image` and :func:`editor_mask`), run them through a
:class:`clic.pipeline.ClicPipeline` and return files and PIL images; the tests call them without a browser. Every
job reports its progress through a callback that may raise :class:`Cancelled` to stop it. Results are shown
whole, scaled up to a readable size when the model is small (:func:`for_display`), whatever its resolution.

One model serves one job at a time. The page queues the jobs (Gradio's queue, one concurrency group of size 1,
which shows each waiting user their position), and a lock in :class:`Workbench` guarantees it even for a job
cancelled in the page whose last step is still running. Every job leaves the model as it found it (learning too),
so one loaded copy serves them all.

The default model is the bundled offline toy model (:func:`clic.models.bundled_model`), or when none ships a tiny
random-init model built once in the user cache (its images are noise: it shows the mechanics only);
``--model`` takes SD1.4 or any diffusers folder. This module is an edge of the package, like :mod:`clic.cli`: the
library never imports it.
"""

from __future__ import annotations

import hashlib
import html
from importlib import resources
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter

from . import roi
from .builder import make_model
from .concept import Concept, applied_concept
from .config import LearnConfig, MatchConfig, learn_config, transfer_config
from .errors import ClicError, InputError
from .generate import GenerateConfig, with_article
from .imaging import MAX_PIXELS, center_crop_box, check_mask, heat_overlay, mask_overlay, resize_mask
from .maps import token_attention_maps
from .models import bundled_model, load_backbone
from .pipeline import ClicPipeline

log = logging.getLogger(__name__)

#: colour of painted and found masks in the editors (RGB, and the alpha the found mask is drawn with): a blue, to
#: stand out on the red and brown objects of the examples
MASK_RGB = (20, 110, 255)
MASK_ALPHA = 150
MIN_IMAGE_SIDE = 16
#: the largest upload the page takes: a concept file of SD1.4 with K, V, Q and out trained is about 180 MB
MAX_UPLOAD_BYTES = 256 * 2**20

Progress = Callable[[dict], None]


class Cancelled(ClicError):
    """The user stopped the job."""


# ---------------------------------------------------------------------------------------------- editor values


def _rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 from a grey, RGB or RGBA array (RGBA composited on white, as :mod:`clic.imaging`)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InputError(f"not an image (array of shape {arr.shape})")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, -1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:].astype(np.float32) / 255.0
        return (arr[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return arr


def editor_image(value, name: str = "source") -> np.ndarray:
    """The image of an ImageEditor value (``{"background", "layers", "composite"}``) as ``(H, W, 3)`` uint8."""
    background = value.get("background") if isinstance(value, dict) else value
    if background is None:
        raise InputError(f"upload a {name} image first")
    h, w = np.shape(background)[:2] if np.ndim(background) >= 2 else (0, 0)
    if h * w > MAX_PIXELS:      # the page decoded it already: refused before any copy of it is made
        raise InputError(f"the {name} image is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels: scale it down first")
    image = _rgb(background)
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise InputError(f"the {name} image is {image.shape[1]}x{image.shape[0]} pixels; it must be at least "
                         f"{MIN_IMAGE_SIDE} pixels on each side")
    return image


def whole(value, name: str) -> int:
    """A whole number from a page field (an int, or a float from a number box): an :class:`InputError` for what is
    not one (empty, NaN, inf, 2.5); ranges are the configs' to check."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
        if number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a whole number, got {value!r}") from None


def editor_mask(value, name: str = "source") -> np.ndarray:
    """The painted mask of an ImageEditor value: ``(H, W)`` bool at the background's size, True where any layer
    has paint (alpha > 0; the eraser clears alpha). An empty mask is an :class:`InputError`."""
    image = editor_image(value, name)
    h, w = image.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        if layer is None:
            continue
        arr = np.asarray(layer)
        painted = arr[..., 3] > 0 if arr.ndim == 3 and arr.shape[-1] == 4 else _rgb(arr).max(-1) > 0
        if painted.shape != (h, w):   # a layer of another size (e.g. a canvas larger than the image): scale it
            painted = np.asarray(Image.fromarray(painted).resize((w, h), Image.NEAREST))
        mask |= painted
    if not mask.any():
        raise InputError(f"the {name} mask is empty: paint the region on the {name} image with the brush"
                         + (" (or press Find region)" if name == "target" else ""))
    return mask


def editor_value(image: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """An ImageEditor value showing ``image`` with ``mask`` as an editable painted layer."""
    image = _rgb(image)
    layers = []
    composite = image
    if mask is not None:
        layer = np.zeros((*image.shape[:2], 4), dtype=np.uint8)
        layer[mask] = (*MASK_RGB, MASK_ALPHA)
        a = layer[..., 3:].astype(np.float32) / 255.0
        composite = (image * (1 - a) + layer[..., :3] * a).round().astype(np.uint8)
        layers = [layer]
    return {"background": image, "layers": layers, "composite": composite}


# ---------------------------------------------------------------------------------------------- model inputs


def _crop_box(w: int, h: int) -> tuple[int, int, int, int]:
    return center_crop_box(w, h)


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """``(3, size, size)`` in [-1, 1]: centre crop and bicubic resize, the transform of :func:`clic.imaging.load_image`."""
    rgb = _rgb(image)
    pil = Image.fromarray(rgb).crop(_crop_box(rgb.shape[1], rgb.shape[0])).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def mask_tensor(mask: np.ndarray, size: int, name: str = "source", threshold: float = 0.5) -> torch.Tensor:
    """Binary ``(1, size, size)``: the same crop as the image, area-resized, thresholded (:func:`clic.imaging.load_mask`)."""
    m = np.asarray(mask, dtype=np.float32)
    if not m.any():
        raise InputError(f"the {name} mask is empty: paint the region on the {name} image")
    left, top, right, bottom = _crop_box(m.shape[1], m.shape[0])
    values = resize_mask(torch.from_numpy(np.ascontiguousarray(m[top:bottom, left:right]))[None], (size, size))
    out = (values > threshold).float()
    try:
        check_mask(out, f"{name} mask")
    except InputError as exc:
        if out.sum() == 0:   # painted, but too thin to survive the resize to the model resolution
            raise InputError(f"the {name} mask vanishes at the model's {size}x{size} resolution (after the centre "
                             "crop): paint a larger region") from exc
        raise
    return out


def full_size_mask(mask: torch.Tensor, wh: tuple[int, int]) -> np.ndarray:
    """A model-resolution mask ``(1, R, R)`` back on the original image: ``(H, W)`` bool, False outside the crop."""
    w, h = wh
    left, top, right, bottom = _crop_box(w, h)
    square = Image.fromarray((mask.reshape(mask.shape[-2:]).float().cpu().numpy() * 255).astype(np.uint8))
    square = np.asarray(square.resize((right - left, bottom - top), Image.BILINEAR)) >= 128
    out = np.zeros((h, w), dtype=bool)
    out[top:bottom, left:right] = square
    return out


def _fingerprint(*arrays) -> str:
    digest = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the jobs


def default_model() -> Path:
    """The bundled toy model, else a tiny random-init model built once in the user cache."""
    bundled = bundled_model()
    if bundled is not None:
        return bundled
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clic" / "tiny-model"
    if not (cache / "model_index.json").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-model.", dir=cache.parent))
        try:
            make_model("tiny", tmp / "m")
            (tmp / "m").rename(cache)       # atomic: another process may have built it meanwhile
        except OSError:
            if not (cache / "model_index.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


@dataclass
class LearnOutput:
    concept_path: Path
    history: list[dict]
    previews: list[tuple[Image.Image, str]]   # (mask overlay | CA(v*) overlay, caption)


@dataclass
class Workbench:
    """The model and the jobs the page runs on it; one job at a time (``self.lock``).

    Args:
        model: diffusers folder or hub id; None: :func:`default_model`.
        workdir: where concept files go (default: a fresh temporary folder).
    """

    model: str | None = None
    device: str | None = None
    dtype: str = "fp32"
    workdir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.model = str(self.model) if self.model is not None else str(default_model())
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="clic-ui-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._pipe = None

    # -- model ------------------------------------------------------------------------------------------------
    def pipeline(self) -> ClicPipeline:
        """The model as a :class:`clic.pipeline.ClicPipeline`, loaded on first use; every job leaves it as it found
        it. Call with ``self.lock`` held."""
        if self._pipe is None:
            started = time.perf_counter()
            self._pipe = ClicPipeline.from_backbone(load_backbone(self.model, self.device, self.dtype))
            self._pipe.set_progress_bar_config(disable=True)
            log.info("loaded %s in %.1f s", self.model, time.perf_counter() - started)
        return self._pipe

    def backbone(self):
        """The pipeline's components as the library takes them (:attr:`ClicPipeline.backbone`). With the lock held."""
        return self.pipeline().backbone

    def load(self):
        """Load the model now if it is not loaded (fails early on a bad ``--model``)."""
        with self.lock:
            return self.pipeline()

    @property
    def offline_model(self) -> bool:
        """True on the toy/tiny models (defaults scaled like ``clic demo``)."""
        name = Path(self.model).name
        return "tiny" in name or "toy" in name

    def defaults(self) -> dict:
        """Starting values of the page's fields: the paper's, with ``clic demo``'s shorter run on the offline model."""
        cfg = LearnConfig()
        return {"steps": 100 if self.offline_model else cfg.steps,
                "lr": 1e-3 if "tiny" in Path(self.model).name else cfg.lr,
                "alpha": cfg.alpha, "lambda_att": cfg.lambda_att, "lambda_roi": cfg.lambda_roi,
                "match_steps": 100 if self.offline_model else 500}

    def _new_path(self, stem: str, suffix: str) -> Path:
        return self.workdir / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"

    # -- learn (sec. 3.1) -------------------------------------------------------------------------------------
    def learn(self, image: np.ndarray, mask: np.ndarray, object_class: str = "object", prompt: str | None = None,
              steps: int | None = None, lr: float | None = None, alpha: float | None = None,
              lambda_att: float | None = None, lambda_roi: float | None = None, seed: int = 0,
              callback: Progress | None = None) -> LearnOutput:
        """Learn v* from an image ``(H, W, 3|4)`` and its mask ``(H, W)``; the concept file goes to the workdir.

        ``callback`` gets ``{"step", "total", "loss", "l_con", "l_att", "l_roi", ...}`` after every step."""
        object_class = (object_class or "").strip() or "object"
        d = self.defaults()
        cfg = learn_config(object_class=object_class, prompt=(prompt or "").strip() or None,
                           steps=whole(steps or d["steps"], "Steps"), lr=lr or d["lr"], alpha=alpha,
                           lambda_att=lambda_att, lambda_roi=lambda_roi, seed=whole(seed, "Seed"), checkpoint_every=0)
        cfg.check()
        with self.lock:
            pipe = self.pipeline()
            backbone = pipe.backbone
            size = backbone.resolution
            pixels = image_tensor(image, size)
            m = mask_tensor(mask, size, "source")      # the page's own message for a mask too thin for the model
            out = self._new_path(_slug(object_class), ".safetensors")

            def on_step(step: int, record: dict) -> None:
                if callback is not None:
                    callback({**record, "total": cfg.steps})

            result = pipe.learn(_rgb(image), np.asarray(mask, dtype=bool), config=cfg, out_path=out, callback=on_step)
            with applied_concept(backbone, result.concept):
                maps = token_attention_maps(backbone, backbone.encode_image(pixels[None].to(backbone.device)),
                                            result.concept.meta["prompt"], result.concept.tokens, seed=cfg.seed)
        token = result.concept.tokens[0]
        previews = [(mask_overlay(pixels, m, MASK_RGB), "mask M_s"), (heat_overlay(pixels, maps[0]), f"CA({token})")]
        return LearnOutput(out, result.history, previews)

    # -- transfer (sec. 3.2) ----------------------------------------------------------------------------------
    def transfer(self, concept_path, image: np.ndarray, mask: np.ndarray, t_start: int | None = None,
                 eta: float | None = None, seed: int = 0, num: int = 1, steps: int = 50, prompt: str | None = None,
                 guidance_scale: float | None = None, callback: Progress | None = None
                 ) -> list[tuple[Image.Image, str]]:
        """Results of transferring the concept into ``mask`` of ``image``: per seed, the result at the target's own
        size and v*'s attention (averaged over the steps) over the model's view of it, as ``(image, caption)``
        pairs."""
        concept = _load_concept(concept_path)
        cfg = transfer_config(steps=whole(steps, "Denoising steps"),
                              t_start=None if t_start is None else whole(t_start, "t_start"), eta=eta,
                              seeds=(whole(seed, "Seed"),), num=whole(num, "Number of results"),
                              prompt=(prompt or "").strip() or None, guidance_scale=guidance_scale)
        cfg.check()
        start = cfg.start_step()
        with self.lock:
            pipe = self.pipeline()
            size = pipe.resolution
            image_tensor(image, size)
            mask_tensor(mask, size, "target")          # the page's own message for a mask too thin for the model
            total = (cfg.steps - start) * cfg.num
            done = [0]

            def on_step(info: dict) -> None:
                done[0] += 1
                if callback is not None:
                    callback({"step": done[0], "total": total, "seed": info["seeds"][0]})

            pipe.load_concept(concept)
            out = pipe.transfer(_rgb(image), np.asarray(mask, dtype=bool), config=cfg, callback=on_step)
        pairs = []
        for k, (result, overlay) in enumerate(zip(out.images, out.attention_overlays())):
            pairs += [(result, f"seed {out.seeds[k]}"), (overlay, f"seed {out.seeds[k]}: CA({out.result.tokens[0]})")]
        return pairs

    # -- generate (sec. 4.1) ----------------------------------------------------------------------------------
    def generate(self, concept_path, object_class: str | None = None, num: int = 4, base_steps: int = 5,
                 seed: int = 0, steps: int = 50, callback: Progress | None = None) -> list[tuple[Image.Image, str]]:
        """Two-stage generation: the first ``base_steps`` (t_s) steps with the base model."""
        concept = _load_concept(concept_path)
        cfg = GenerateConfig(object_class=(object_class or "").strip() or None, num=whole(num, "Number of images"),
                             seeds=(whole(seed, "Seed"),), base_steps=whole(base_steps, "t_s"),
                             steps=whole(steps, "Steps"))
        cfg.check()
        with self.lock:
            pipe = self.pipeline()
            pipe.load_concept(concept)
            total = cfg.steps * cfg.num
            done = [0]

            def on_step(info: dict) -> None:
                done[0] += len(info["seeds"])
                if callback is not None:
                    callback({"step": done[0], "total": total, "stage": info["stage"]})

            out = pipe.generate(config=cfg, callback=on_step)
        return [(image, f"seed {s}") for image, s in zip(out.images, out.seeds)]

    # -- find region (sec. 3.3) -------------------------------------------------------------------------------
    def learn_matcher(self, concept_path, source: np.ndarray, source_mask: np.ndarray, steps: int | None = None,
                      callback: Progress | None = None) -> Path:
        """w* learned on the source image and mask under the concept (the first half of "Find region")."""
        concept = _load_concept(concept_path)
        d = self.defaults()
        steps = whole(steps or d["match_steps"], "w* steps")
        cfg = MatchConfig(steps=steps, lr=d["lr"])
        with self.lock:
            backbone = self.backbone()
            concept.check_base(backbone, "the concept")
            size = backbone.resolution

            def on_step(step: int, record: dict) -> None:
                if callback is not None:
                    callback({**record, "total": steps})

            matcher = roi.learn_matcher(backbone, concept, image_tensor(source, size),
                                        mask_tensor(source_mask, size, "source"), cfg, concept_path=concept_path,
                                        progress=False, callback=on_step)
        return matcher.save(self._new_path("matcher", ".safetensors"))

    def find_region(self, matcher_path, concept_path, target: np.ndarray) -> np.ndarray:
        """M_tg found by w* on ``target (H, W, 3)``: ``(H, W)`` bool (False outside the centre crop)."""
        concept = _load_concept(concept_path)
        matcher = roi.Matcher.load(matcher_path, concept)
        with self.lock:
            backbone = self.backbone()
            m = roi.auto_target_mask(backbone, matcher, image_tensor(target, backbone.resolution))
        rgb = _rgb(target)
        mask = full_size_mask(m, (rgb.shape[1], rgb.shape[0]))
        if not mask.any():
            raise InputError("no region found on the target: paint the mask by hand")
        return mask


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")
    return (keep or "concept")[:32]


def _load_concept(path):
    if not path:
        raise InputError("no concept yet: learn one in the source panel, or upload a concept file")
    return Concept.load(path)


# ---------------------------------------------------------------------------------------------- running a job


def run_job(work: Callable[[Progress], object], stop: threading.Event, poll: float = 0.2):
    """Run ``work(report)`` in a thread; yield ``("progress", info)`` for each report and ``("done", result)`` at
    the end (its exception is re-raised here). Once ``stop`` is set, the next report raises :class:`Cancelled` in
    the worker; closing this generator (a cancelled page event) sets ``stop`` too."""
    events: queue.Queue = queue.Queue()

    def report(info: dict) -> None:
        if stop.is_set():
            raise Cancelled(f"cancelled at step {info.get('step', '?')}")
        events.put(("progress", info))

    def target():
        try:
            events.put(("done", work(report)))
        except BaseException as exc:   # handed to the page's thread
            events.put(("error", exc))

    thread = threading.Thread(target=target, name="clic-ui-job", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, payload = events.get(timeout=poll)
            except queue.Empty:
                yield ("wait", None)
                continue
            if kind == "error":
                raise payload
            yield kind, payload
            if kind == "done":
                return
    finally:
        stop.set()


def message(exc: BaseException) -> str:
    """What the page shows for an exception: a library error's own message, never a stack trace."""
    if isinstance(exc, ClicError):
        return str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "the GPU ran out of memory; try fewer results or a smaller model"
    log.error("job failed", exc_info=exc)
    return f"unexpected error ({exc.__class__.__name__}: {exc}); details are in the server's log"


def loss_line(info: dict) -> str:
    return (f"step {info['step']}/{info['total']}  loss {info['loss']:.4f}  (l_con {info['l_con']:.4f}, "
            f"l_att {info['l_att']:.4f}, l_roi {info['l_roi']:.4f})")


#: the loss terms of eq. 5 the page plots while learning
LOSS_TERMS = ("l_con", "l_att", "l_roi")
#: results are shown at least this large: a small model's 64 or 128 px outputs are scaled up, never cropped
DISPLAY_SIDE = 384


def loss_table(history: list[dict]):
    """The loss terms so far as the page's plot takes them: one row per (step, term)."""
    import pandas as pd  # gradio's own dependency: only the page needs it

    rows = [{"step": int(r["step"]), "term": term, "value": float(r[term])} for r in history for term in LOSS_TERMS
            if term in r]
    # typed columns also when empty: the plot reads numeric axes from the types (an untyped column is a category)
    return pd.DataFrame(rows, columns=["step", "term", "value"]).astype({"step": "int64", "term": "str",
                                                                          "value": "float64"})


def for_display(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest neighbour: the model's pixels stay visible and sharp) until its
    longer side reaches ``side``; larger images as they are."""
    factor = -(-side // max(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def example_dir() -> Path:
    return Path(str(resources.files("clic") / "assets" / "examples"))


#: the page's examples: (label, source, target, object class); each image's mask is NAME_mask.png next to it
EXAMPLES = (("toy_source.png -> toy_target.png", "toy_source.png", "toy_target.png", "chair"),
            ("chair.png -> toy_target.png", "chair.png", "toy_target.png", "chair"))


def example_thumbnail(source: str, target: str, side: int = 160) -> Image.Image:
    """An example at a glance: the source and the target, each with its mask drawn over it, side by side."""
    tiles = []
    for name in (source, target):
        path = example_dir() / name
        mask = Image.open(path.with_name(path.stem + "_mask.png")).convert("L").resize((side, side), Image.NEAREST)
        inside = np.asarray(mask) >= 128
        # the mask's outline, 2 px, in white and black: visible on any colour the object has
        grown = np.asarray(mask.filter(ImageFilter.MaxFilter(5))) >= 128
        ring = grown & ~inside
        tile = np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.NEAREST)).copy()
        tile[ring] = 255
        tile[ring & ((np.indices(ring.shape).sum(0) // 4) % 2 == 0)] = 0
        tiles.append(Image.fromarray(tile))
    sheet = Image.new("RGB", (2 * side + 8, side), "white")
    sheet.paste(tiles[0], (0, 0))
    sheet.paste(tiles[1], (side + 8, 0))
    return sheet


def example_values(source: str, target: str) -> tuple[dict, dict]:
    """The editor values (image + its mask as a painted layer) of a shipped example's source and target."""
    def value(name: str) -> dict:
        path = example_dir() / Path(name).name
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(path.with_name(path.stem + "_mask.png")).convert("L")) >= 128
        return editor_value(image, mask)

    return value(source), value(target)


# ---------------------------------------------------------------------------------------------- the page


CSS = """
#clic-header p { margin: 0; }
.clic-status { min-height: 2.2em; font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


gr = None   # gradio, imported by build_app(): clic's other commands do not need it


def build_app(bench: Workbench):
    """The Gradio page on ``bench`` (not launched). Queue: one job at a time, in concurrency group "model"."""
    global gr   # module-level, so that Gradio can resolve the handlers' ``gr.Request`` annotations
    import gradio as gr  # an optional dependency (the [ui] extra): imported when the page is built

    d = bench.defaults()
    stops: dict[str, threading.Event] = {}

    def stop_event(request: gr.Request | None) -> threading.Event:
        key = getattr(request, "session_hash", None) or "default"
        stops[key] = threading.Event()
        return stops[key]

    def cancel(request: gr.Request):
        # the job's own generator reports "Stopped: cancelled at step N" once its worker has stopped
        event = stops.get(getattr(request, "session_hash", None) or "default")
        if event is not None:
            event.set()

    def stream(name: str, work, on_progress, progress, request, n_outputs: int):
        """Drive ``run_job`` for a page event. ``work(report)`` returns ``(status, {output index: value})``; the
        status box is output 0 and shows progress (``on_progress(info)``: a status line, or ``(status, {output index:
        value})`` to update other outputs too, e.g. the loss plot) and messages; errors also as a toast."""
        def row(status: str, values: dict | None = None) -> list:
            out = [status] + [gr.skip()] * (n_outputs - 1)
            for index, value in (values or {}).items():
                out[index] = value
            return out

        started = time.perf_counter()
        log.info("%s started", name)
        try:
            for kind, payload in run_job(work, stop_event(request)):
                if kind == "progress":
                    progress((payload["step"], payload["total"]), unit="steps")
                    update = on_progress(payload)
                    yield row(*update) if isinstance(update, tuple) else row(update)
                elif kind == "done":
                    log.info("%s done in %.1f s", name, time.perf_counter() - started)
                    yield row(*payload)
        except Exception as exc:
            text = message(exc)
            log.info("%s stopped after %.1f s: %s", name, time.perf_counter() - started, text)
            if isinstance(exc, Cancelled):
                gr.Warning(html.escape(text))
                yield row(f"Stopped: {text}")
                return
            # a toast plus the status box; not gr.Error, which would cover the outputs (and the status) with "Error"
            gr.Warning(html.escape(text), duration=20, title="Error")
            yield row(f"Error: {text}")

    # -- handlers: each runs work(report) -> (status, {output index: value}) through stream() -----------------
    def on_learn(editor, object_class, prompt, steps, lr, alpha, lambda_att, lambda_roi, seed, state,
                 request: gr.Request, progress=gr.Progress()):
        history, shown = [], [0.0]

        def work(report):
            image, mask = editor_image(editor, "source"), editor_mask(editor, "source")
            out = bench.learn(image, mask, object_class, prompt, steps, lr, alpha, lambda_att, lambda_roi, seed,
                              callback=report)
            last = out.history[-1]
            name = out.concept_path.name
            return (f"Learned {name}: {loss_line({**last, 'total': last['step']})}",
                    {1: str(out.concept_path), 2: [(for_display(im), c) for im, c in out.previews],
                     3: {**(state or {}), "concept": str(out.concept_path), "matcher": None},
                     4: f"Concept: {name} (learned here)", 5: loss_table(out.history)})

        def on_progress(info):
            # the plot is redrawn about once a second (a redraw per step would flood the browser on a fast model)
            history.append(info)
            if time.perf_counter() - shown[0] < 1.0 and info["step"] < info["total"]:
                return loss_line(info)
            shown[0] = time.perf_counter()
            return loss_line(info), {5: loss_table(history)}

        # outputs: status, concept file, previews, state, concept name, loss plot
        yield from stream("learn", work, on_progress, progress, request, 6)

    def on_upload_concept(file, state):
        if file is None:
            return gr.skip(), gr.skip()
        try:
            concept = Concept.load(file)
        except ClicError as exc:
            gr.Warning(html.escape(message(exc)), duration=20, title="Error")
            return gr.skip(), f"Error: {message(exc)}"
        return ({**(state or {}), "concept": str(file), "matcher": None},
                f"Concept: {Path(file).name} (uploaded; tokens {' '.join(concept.tokens)}, object "
                f"{concept.meta.get('object_class', '?')})")

    def on_find(target_editor, source_editor, match_steps, state, request: gr.Request, progress=gr.Progress()):
        state = state or {}

        def work(report):
            concept = state.get("concept")
            target = editor_image(target_editor, "target")
            _load_concept(concept)
            try:
                source, source_mask = editor_image(source_editor, "source"), editor_mask(source_editor, "source")
            except InputError as exc:
                raise InputError("Find region learns a token w* on the source image and its mask (paper sec. 3.3): "
                                 f"keep them in the source panel ({exc})") from None
            # w* depends on the concept, the source and its mask: learned once, reused for every target
            key = f"{concept}:{_fingerprint(source, source_mask)}:{whole(match_steps or 0, 'w* steps')}"
            matcher = state.get("matcher")
            if not matcher or state.get("matcher_key") != key or not Path(matcher).is_file():
                matcher = str(bench.learn_matcher(concept, source, source_mask, match_steps, callback=report))
            mask = bench.find_region(matcher, concept, target)
            return (f"Region found ({mask.mean():.0%} of the image): correct it with the brush and eraser",
                    {1: editor_value(target, mask), 2: {**state, "matcher": matcher, "matcher_key": key}})

        # outputs: status, target editor, state
        yield from stream("find region", work,
                          lambda i: f"learning w*: step {i['step']}/{i['total']}  l_att {i['l_att']:.4f}",
                          progress, request, 3)

    def on_transfer(editor, t_start, eta, seed, num, steps, prompt, guidance, state, request: gr.Request,
                    progress=gr.Progress()):
        def work(report):
            image, mask = editor_image(editor, "target"), editor_mask(editor, "target")
            results = bench.transfer((state or {}).get("concept"), image, mask, t_start, eta, seed, num, steps,
                                     prompt, guidance, callback=report)
            return (f"Transferred: {len(results) // 2} result(s)",
                    {1: [(for_display(im), caption) for im, caption in results]})

        yield from stream("transfer", work, lambda i: f"transfer: step {i['step']}/{i['total']}", progress,
                          request, 2)

    def on_generate(object_class, num, base_steps, seed, steps, state, request: gr.Request, progress=gr.Progress()):
        def work(report):
            images = bench.generate((state or {}).get("concept"), object_class, num, base_steps, seed, steps,
                                    callback=report)
            return f"Generated {len(images)} image(s)", {1: [(for_display(im), c) for im, c in images]}

        yield from stream("generate", work,
                          lambda i: f"generate ({i['stage']} stage): step {i['step']}/{i['total']}",
                          progress, request, 2)

    def editor(label: str, elem_id: str, value=None):
        return gr.ImageEditor(value, label=label, elem_id=elem_id, type="numpy", image_mode="RGBA",
                              sources=("upload",), transforms=(), layers=False, format="png", height=420,
                              brush=gr.Brush(colors=[(f"rgb{MASK_RGB}", 0.6)], color_mode="fixed"),
                              eraser=gr.Eraser())

    def status_box(elem_id: str, value: str = ""):
        # a read-only text box, not Markdown: messages hold <v*>, which Markdown would take for HTML
        return gr.Textbox(value, show_label=False, interactive=False, container=False, elem_id=elem_id,
                          elem_classes="clic-status")

    def gallery(label: str, elem_id: str, columns: int):
        # never cropped: each image whole in its cell ("contain"), the gallery as tall as its rows
        return gr.Gallery(label=label, columns=columns, height="auto", object_fit="contain", allow_preview=True,
                          elem_id=elem_id, format="png")

    def prefill(object_class):
        return f"{with_article((object_class or '').strip() or 'object')} with <v*> style"

    def on_example(index: int):
        label, source, target, object_class = EXAMPLES[index]
        return (*example_values(source, target), object_class, prefill(object_class),
                f"Example: {label}. Press Learn", "")

    def on_example_selected(evt: gr.SelectData):
        return on_example(evt.index)

    # -- layout -----------------------------------------------------------------------------------------------
    with gr.Blocks(title="CLiC", analytics_enabled=False) as app:
        state = gr.State({})
        note = (" (a tiny random-init model: it shows the mechanics, its images are noise; start with `--model` "
                "for Stable Diffusion)" if "tiny" in Path(bench.model).name else "")
        gr.Markdown(f"## CLiC: Concept Learning in Context\nModel: `{Path(bench.model).name}`{note}. Learn a concept "
                    "from a source image and its mask, transfer it into a region of a target, or generate new objects "
                    "with it. Jobs run one at a time; a waiting job shows its place in the queue.",
                    elem_id="clic-header")
        examples_box = gr.Column()          # filled below, once the editors the examples fill exist
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("### 1. Source: learn the concept v*\nUpload an image and paint the concept's region "
                            "(brush; eraser to correct), or start from an example above.")
                src = editor("Source image and mask M_s", "source-editor")
                with gr.Row():
                    object_class = gr.Textbox(EXAMPLES[0][3], label="Object class (OBJECT)", elem_id="object-class")
                    prompt = gr.Textbox(prefill(EXAMPLES[0][3]), label="Prompt P_s (must contain <v*>)",
                                        elem_id="prompt")
                object_class.change(prefill, object_class, prompt, queue=False, show_progress="hidden")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        steps = gr.Number(d["steps"], label="Steps (paper: 500)", precision=0, minimum=1,
                                          elem_id="learn-steps")
                        lr = gr.Number(d["lr"], label="Learning rate (paper: 1e-5)", minimum=0)
                        seed_l = gr.Number(0, label="Seed", precision=0)
                    with gr.Row():
                        alpha = gr.Slider(0, 1, d["alpha"], step=0.05, label="alpha of the soft mask (eq. 2)")
                        lambda_att = gr.Slider(0, 2, d["lambda_att"], step=0.05, label="lambda_att (eq. 5)")
                        lambda_roi = gr.Slider(0, 2, d["lambda_roi"], step=0.05, label="lambda_RoI (eq. 5)")
                with gr.Row():
                    learn_btn = gr.Button("Learn", variant="primary", elem_id="learn-btn")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                learn_status = status_box("learn-status")
                # no value until the first steps: the plot builds its colour scale (one line per term) from the
                # value it first draws and keeps it as later values stream in, so an empty table here would leave
                # every line without a colour (invisible) and the legend empty while learning
                # (and no fixed height: the legend is drawn below a plot of the given height, where it is cut off)
                loss_plot = gr.LinePlot(None, x="step", y="value", color="term",
                                        label="Loss terms while learning: l_con (eq. 3), l_att (eq. 1), l_RoI (eq. 4)",
                                        x_title="step", y_title="loss", elem_id="loss-plot")
                previews = gallery("The mask M_s and v*'s attention on the source", "learn-preview", 2)
                concept_name = status_box("concept-name", "Concept: none yet")
                with gr.Row():
                    concept_file = gr.File(label="Concept file (download)", interactive=False,
                                           elem_id="concept-file")
                    concept_upload = gr.File(label="...or upload a concept file", file_types=[".safetensors"],
                                             type="filepath", elem_id="concept-upload")
            with gr.Column():
                gr.Markdown("### 2. Target: transfer v*\nUpload an image and paint the region to edit, or press "
                            "Find region (sec. 3.3) and correct what it found.")
                tgt = editor("Target image and mask M_tg", "target-editor")
                with gr.Row():
                    t_start = gr.Slider(0, 49, 15, step=1, label="t_start (of the steps; paper: 5..15 of 50)",
                                        elem_id="t-start")
                    eta = gr.Slider(0, 10, 1.0, step=0.1, label="eta, attention guidance (eq. 7)", elem_id="eta")
                with gr.Row():
                    seed_t = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    num_t = gr.Slider(1, 8, 1, step=1, label="Number of results", elem_id="num-results")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        steps_t = gr.Number(50, label="Denoising steps", precision=0, minimum=1, elem_id="t-steps")
                        guidance = gr.Number(7.5, label="CFG scale")
                        match_steps = gr.Number(d["match_steps"], label="Find region: w* steps (paper: 500)",
                                                precision=0, minimum=1, elem_id="match-steps")
                    prompt_t = gr.Textbox("", label="Prompt (default: the concept's)")
                with gr.Row():
                    find_btn = gr.Button("Find region", elem_id="find-btn")
                    transfer_btn = gr.Button("Transfer", variant="primary", elem_id="transfer-btn")
                    cancel_t = gr.Button("Cancel", variant="stop", elem_id="cancel-transfer-btn")
                transfer_status = status_box("transfer-status")
                results = gallery("Each result (at the target's size) and v*'s attention beside it",
                                  "transfer-results", 2)
        with gr.Row():
            with gr.Column():
                gr.Markdown("### 3. Generate new objects with v* (two-stage sampling, sec. 4.1)")
                with gr.Row():
                    gen_object = gr.Textbox("", label="Object (default: the concept's)", elem_id="gen-object")
                    gen_num = gr.Slider(1, 8, 4, step=1, label="Number of images")
                    gen_ts = gr.Slider(0, 50, 5, step=1, label="t_s: base-model steps (paper: 5)")
                    gen_seed = gr.Number(0, label="Seed", precision=0)
                    gen_steps = gr.Number(50, label="Steps", precision=0, minimum=1)
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    cancel_g = gr.Button("Cancel", variant="stop")
                gen_status = status_box("generate-status")
                gen_gallery = gallery("Generated", "generate-results", 4)
        # the shipped examples: a click puts the source and the target, each with its mask, in the editors
        with examples_box:
            example_gallery = gr.Gallery(
                [(example_thumbnail(src_name, tgt_name), label) for label, src_name, tgt_name, _ in EXAMPLES],
                label="Examples: click one to load its source and target, masks included (outlined)", columns=5,
                fit_columns=False, height=230, object_fit="contain", allow_preview=False, interactive=False,
                format="png", elem_id="examples")
        example_outputs = [src, tgt, object_class, prompt, learn_status, transfer_status]
        example_gallery.select(on_example_selected, None, example_outputs, queue=False, show_progress="hidden")
        # The editors start empty, not on an example: Gradio's editor drops a file uploaded over a value set by the
        # server (the upload shows, but the value sent stays the old one), so an opening example would be learned
        # from in place of a user's first upload.

        # -- events: the model jobs share one concurrency group of size 1; progress shows in the status box only,
        # so that the loss line, the plot and earlier results stay readable while a job runs
        job = dict(concurrency_id="model", concurrency_limit=1, show_progress="minimal")
        learn_btn.click(on_learn, [src, object_class, prompt, steps, lr, alpha, lambda_att, lambda_roi, seed_l, state],
                        [learn_status, concept_file, previews, state, concept_name, loss_plot],
                        show_progress_on=learn_status, **job)
        find_btn.click(on_find, [tgt, src, match_steps, state], [transfer_status, tgt, state],
                       show_progress_on=transfer_status, **job)
        transfer_btn.click(on_transfer, [tgt, t_start, eta, seed_t, num_t, steps_t, prompt_t, guidance, state],
                           [transfer_status, results], show_progress_on=transfer_status, **job)
        gen_btn.click(on_generate, [gen_object, gen_num, gen_ts, gen_seed, gen_steps, state],
                      [gen_status, gen_gallery], show_progress_on=gen_status, **job)
        # Cancel sets the session's stop flag: the job stops after its current step and frees the model (Gradio's
        # own `cancels=` would drop the event at once, with the step still running and no message)
        for button in (cancel_btn, cancel_t, cancel_g):
            button.click(cancel, None, None, queue=False, show_progress="hidden")
        concept_upload.upload(on_upload_concept, [concept_upload, state], [state, concept_name], queue=False)
        steps_t.change(lambda n, t: gr.update(maximum=max(int(n or 1) - 1, 0), value=min(t, max(int(n or 1) - 1, 0))),
                       [steps_t, t_start], t_start, queue=False, show_progress="hidden")
    app.queue(default_concurrency_limit=1)
    return app


def launch(bench: Workbench, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Build and start the page; returns the Gradio app (``block=False``: the server runs in a thread)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(bench)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
               show_error=False, css=CSS, allowed_paths=[str(bench.workdir)], footer_links=[],
               max_file_size=MAX_UPLOAD_BYTES)
    if block:
        print(f"clic ui: {app.local_url}{f'  public link: {app.share_url}' if share else ''}  (model {bench.model}; "
              "Ctrl+C stops)", flush=True)
        app.block_thread()
    return app
