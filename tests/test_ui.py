"""The web UI's logic without a browser: editor values -> masks, the jobs on the tiny model, error messages,
the page's queue settings and the ``clic ui`` command. (The browser test is tests/test_ui_browser.py.)"""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clic.errors import ClicError, InputError
from clic.ui import (Cancelled, Workbench, editor_image, editor_mask, editor_value, full_size_mask, image_tensor,
                     mask_tensor, message, run_job)


def rgb_image(h=96, w=128, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def box_mask(h=96, w=128, box=(20, 70, 40, 100)):
    m = np.zeros((h, w), dtype=bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def layer(mask, alpha=153):
    out = np.zeros((*mask.shape, 4), dtype=np.uint8)
    out[mask] = (255, 59, 48, alpha)
    return out


# ---------------------------------------------------------------------------------------------- editor values


def test_editor_mask_is_the_union_of_painted_layers():
    image = rgb_image()
    a, b = box_mask(box=(0, 10, 0, 10)), box_mask(box=(50, 60, 50, 60))
    value = {"background": np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
             "layers": [layer(a), layer(b, alpha=1), None], "composite": None}
    assert (editor_mask(value) == (a | b)).all()
    assert editor_image(value).shape == (96, 128, 3)


def test_editor_mask_scales_a_layer_of_another_size():
    value = {"background": rgb_image(), "layers": [layer(box_mask(48, 64, (10, 35, 20, 50)))], "composite": None}
    mask = editor_mask(value)
    assert mask.shape == (96, 128)
    assert (mask == box_mask(96, 128, (20, 70, 40, 100))).all()


def test_editor_value_round_trip():
    image, mask = rgb_image(), box_mask()
    value = editor_value(image, mask)
    assert (editor_mask(value) == mask).all()
    assert (editor_image(value) == image).all()


@pytest.mark.parametrize("layers", [[], [np.zeros((96, 128, 4), np.uint8)]], ids=["no layer", "erased"])
def test_empty_mask_is_a_clean_message(layers):
    with pytest.raises(InputError, match="the target mask is empty: paint the region on the target image"):
        editor_mask({"background": rgb_image(), "layers": layers, "composite": None}, "target")


def test_missing_or_tiny_image_is_a_clean_message():
    with pytest.raises(InputError, match="upload a source image first"):
        editor_mask({"background": None, "layers": [], "composite": None})
    with pytest.raises(InputError, match="upload a source image first"):
        editor_image(None)
    with pytest.raises(InputError, match="at least 16 pixels"):
        editor_image({"background": rgb_image(8, 8), "layers": []})


# ---------------------------------------------------------------------------------------------- model inputs


def test_inputs_match_the_file_loaders(tmp_path):
    """The page's arrays get exactly the transform of clic.imaging.load_image / load_mask (crop, resize)."""
    from clic.imaging import load_image, load_mask

    image, mask = rgb_image(100, 150), box_mask(100, 150, (10, 80, 50, 120))
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    assert torch.equal(image_tensor(image, 64), load_image(tmp_path / "i.png", 64))
    assert torch.equal(mask_tensor(mask, 64), load_mask(tmp_path / "m.png", 64, (150, 100)))


def test_mask_outside_the_crop_or_everywhere_is_refused():
    outside = box_mask(100, 200, (0, 100, 0, 40))          # left of the centre square
    with pytest.raises(InputError, match="vanishes at the model's 64x64 resolution"):
        mask_tensor(outside, 64, "source")
    with pytest.raises(InputError, match="covers the whole image"):
        mask_tensor(np.ones((64, 64), bool), 64, "source")


def test_found_mask_goes_back_to_the_full_image():
    square = torch.zeros(1, 64, 64)
    square[:, 16:48, 8:40] = 1
    full = full_size_mask(square, (200, 100))
    assert full.shape == (100, 200)
    assert not full[:, :50].any() and not full[:, 150:].any()   # outside the centre crop
    assert torch.equal(mask_tensor(full, 64), square)


# ---------------------------------------------------------------------------------------------- running a job


def test_run_job_streams_progress_then_the_result():
    def work(report):
        for step in range(1, 4):
            report({"step": step, "total": 3})
        return "result"

    events = [e for e in run_job(work, threading.Event(), poll=0.01) if e[0] != "wait"]
    assert events == [("progress", {"step": s, "total": 3}) for s in (1, 2, 3)] + [("done", "result")]


def test_run_job_cancel_stops_the_worker():
    stop = threading.Event()
    reached = []

    def work(report):
        for step in range(1, 1000):
            reached.append(step)
            report({"step": step, "total": 999})
            time.sleep(0.01)
        return "never"

    with pytest.raises(Cancelled, match="cancelled at step"):
        for kind, info in run_job(work, stop, poll=0.01):
            if kind == "progress" and info["step"] == 2:
                stop.set()
    assert len(reached) < 999


def test_messages_never_hold_a_traceback():
    assert message(InputError("the source mask is empty")) == "the source mask is empty"
    text = message(RuntimeError("boom"))
    assert "RuntimeError: boom" in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------------- jobs on the tiny model


@pytest.fixture(scope="module")
def bench(tiny_model_dir, tmp_path_factory):
    return Workbench(tiny_model_dir, "cpu", workdir=tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def learned(bench):
    steps = []
    out = bench.learn(rgb_image(), box_mask(), "chair", steps=2, callback=lambda info: steps.append(info))
    return out, steps


def test_learn_two_steps_writes_a_concept_file(learned, bench):
    from clic.concept import Concept

    out, steps = learned
    assert out.concept_path.is_file() and out.concept_path.parent == bench.workdir
    assert not list(bench.workdir.glob("*.ckpt"))
    concept = Concept.load(out.concept_path)
    assert concept.tokens == ["<v*>"] and concept.meta["prompt"] == "a chair with <v*> style"
    assert [s["step"] for s in steps] == [1, 2] and all(s["total"] == 2 for s in steps)
    assert {"l_con", "l_att", "l_roi"} <= set(steps[-1])
    assert [caption for _, caption in out.previews] == ["mask M_s", "CA(<v*>)"]


def test_learn_can_be_cancelled_and_the_next_job_starts_clean(bench, learned):
    def stop_after_first(info):
        raise Cancelled(f"cancelled at step {info['step']}")

    with pytest.raises(Cancelled, match="step 1"):
        bench.learn(rgb_image(), box_mask(), "chair", steps=50, callback=stop_after_first)
    out = bench.learn(rgb_image(), box_mask(), "chair", steps=1)     # a fresh model: <v*> is free again
    assert out.concept_path.is_file()


def test_learn_refuses_a_prompt_without_the_token(bench):
    with pytest.raises(InputError, match="does not contain the placeholder <v\\*>"):
        bench.learn(rgb_image(), box_mask(), "chair", prompt="a chair", steps=1)


def test_transfer_gives_results_and_attention_overlays(bench, learned):
    out, _ = learned
    seen = []
    results = bench.transfer(out.concept_path, rgb_image(80, 80, seed=1), box_mask(80, 80, (10, 50, 20, 60)),
                             t_start=2, num=2, steps=4, callback=seen.append)
    assert [c for _, c in results] == ["seed 0", "seed 0: CA(<v*>)", "seed 1", "seed 1: CA(<v*>)"]
    # each result at the target's own size, its attention over the model's 64 px view of it
    assert [im.size for im, _ in results] == [(80, 80), (64, 64)] * 2
    assert [s["step"] for s in seen] == [1, 2, 3, 4] and seen[-1]["total"] == 4
    assert bench.backbone().unet.attn_processors is not None


def test_transfer_errors_are_clean_messages(bench, learned):
    out, _ = learned
    with pytest.raises(InputError, match="target mask"):
        bench.transfer(out.concept_path, rgb_image(), np.zeros((96, 128), bool), steps=2, t_start=1)
    with pytest.raises(InputError, match="no concept yet"):
        bench.transfer(None, rgb_image(), box_mask(), steps=2)
    with pytest.raises(ClicError, match="t-start 7 is outside the 2-step schedule"):
        bench.transfer(out.concept_path, rgb_image(), box_mask(), steps=2, t_start=7)


def test_generate_images(bench, learned):
    out, _ = learned
    images = bench.generate(out.concept_path, "vase", num=2, base_steps=1, steps=2)
    assert [c for _, c in images] == ["seed 0", "seed 1"] and all(im.size == (64, 64) for im, _ in images)


def test_find_region_returns_an_editable_full_size_mask(bench, learned):
    out, _ = learned
    matcher = bench.learn_matcher(out.concept_path, rgb_image(), box_mask(), steps=2)
    target = rgb_image(90, 120, seed=3)
    mask = bench.find_region(matcher, out.concept_path, target)
    assert mask.shape == (90, 120) and mask.dtype == bool and mask.any()
    assert (editor_mask(editor_value(target, mask), "target") == mask).all()


# ---------------------------------------------------------------------------------------------- the page and CLI


def test_page_queues_model_jobs_one_at_a_time(bench):
    pytest.importorskip("gradio")
    from clic.ui import build_app

    app = build_app(bench)
    jobs = [fn for fn in app.fns.values() if fn.concurrency_id == "model"]
    names = sorted(fn.fn.__name__ for fn in jobs)
    assert names == ["on_find", "on_generate", "on_learn", "on_transfer"]
    assert all(fn.concurrency_limit == 1 for fn in jobs)
    assert all(fn.queue for fn in jobs)
    # the loss plot starts without a value: it takes its colour scale (one line per term) from the first value it
    # draws and keeps it while values stream in, so an empty table would leave the lines colourless while learning;
    # and no fixed height, which would cut off the legend (tests/test_ui_browser.py checks both in the page)
    plot = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "loss-plot")
    assert plot.value is None and plot.height is None


def test_small_results_are_scaled_up_whole_and_the_loss_table_has_the_three_terms():
    from clic.ui import DISPLAY_SIDE, example_values, for_display, loss_table

    small = Image.fromarray(rgb_image(64, 48))
    shown = for_display(small)
    assert shown.size == (48 * 6, 64 * 6) and max(shown.size) >= DISPLAY_SIDE      # whole, aspect ratio kept
    assert np.array_equal(np.asarray(shown)[::6, ::6], np.asarray(small))           # the model's pixels, not blurred
    big = Image.fromarray(rgb_image(512, 400))
    assert for_display(big) is big
    table = loss_table([{"step": 1, "l_con": 0.5, "l_att": 0.2, "l_roi": 0.9, "loss": 1.0}])
    assert sorted(table["term"]) == ["l_att", "l_con", "l_roi"] and list(table.columns) == ["step", "term", "value"]
    source, target = example_values("toy_source.png", "toy_target.png")     # the shipped examples, masks included
    assert editor_mask(source).any() and editor_mask(target, "target").any()


def test_cli_options_and_a_bad_model_is_one_line(capsys, tmp_path):
    from clic.cli import build_parser, main

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", None, False, None)
    assert main(["ui", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clic: error:") and "\n" not in err
