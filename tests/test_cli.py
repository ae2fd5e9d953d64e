"""The ``clic`` command: a real run, and every bad input -> one line on stderr, exit code 2, no output file."""

import json

import numpy as np
import pytest
from PIL import Image

from clic.cli import main


@pytest.fixture
def files(tmp_path, example_paths):
    image, mask = example_paths
    Image.new("L", (256, 256), 0).save(tmp_path / "empty.png")
    Image.new("L", (256, 256), 255).save(tmp_path / "full.png")
    Image.new("L", (256, 128), 255).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return {"image": image, "mask": mask, "dir": tmp_path}


def _learn(model, files, *extra, out=None):
    out = out or files["dir"] / "c.safetensors"
    argv = ["learn", "--model", model, "--device", "cpu", "--out", str(out), "--steps", "2", "-q",
            "--object-class", "chair", *extra]
    if "--image" not in extra:
        argv += ["--image", files["image"]]
    if "--mask" not in extra:
        argv += ["--mask", files["mask"]]
    return main(argv), out


def test_learn_writes_concept_log_and_maps(tiny_model_dir, files, capsys):
    maps = files["dir"] / "maps"
    rc, out = _learn(tiny_model_dir, files, "--save-maps", str(maps))
    assert rc == 0, capsys.readouterr().err
    assert out.exists()
    log = [json.loads(l) for l in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and {"l_con", "l_att", "l_roi"} <= set(log[0])
    assert (maps / "grid.png").exists() and (maps / "attention_0_0.png").exists()
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == ["<v*>"] and info["object_class"] == "chair"


def test_image_modes_rgba_grayscale_16bit(tiny_model_dir, files, capsys):
    src = Image.open(files["image"])
    rgba = src.convert("RGBA")
    rgba.save(files["dir"] / "rgba.png")
    src.convert("L").save(files["dir"] / "gray.png")
    arr16 = (np.asarray(src.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(files["dir"] / "gray16.png")
    src.save(files["dir"] / "img.webp")
    for name in ("rgba.png", "gray.png", "gray16.png", "img.webp"):
        rc, _ = _learn(tiny_model_dir, files, "--image", str(files["dir"] / name),
                       out=files["dir"] / f"{name}.safetensors")
        assert rc == 0, (name, capsys.readouterr().err)


def test_soft_mask_is_thresholded_and_resized(tiny_model_dir, files, capsys):
    m = np.asarray(Image.open(files["mask"]).convert("L"), dtype=np.float32) * 0.8
    Image.fromarray(m.astype(np.uint8)).resize((512, 512)).save(files["dir"] / "soft.png")
    rc, _ = _learn(tiny_model_dir, files, "--mask", str(files["dir"] / "soft.png"))
    assert rc == 0, capsys.readouterr().err


BAD = [
    (["--image", "nope.png"], "nope.png: file not found"),
    (["--image", "{dir}/broken.png"], "not a readable image"),
    (["--mask", "{dir}/empty.png"], "mask is empty"),
    (["--mask", "{dir}/full.png"], "covers the whole image"),
    (["--mask", "{dir}/wide.png"], "different aspect ratio"),
    (["--prompt", "a chair with ornaments"], "does not contain the placeholder <v*>"),
    (["--placeholder", "chair", "--prompt", "a chair with chair style"], "already in the tokenizer's vocabulary"),
    (["--initializer", "ktn"], "not a single token"),
    (["--mask", "{mask}", "--mask", "{mask}", "--image", "{image}", "--image", "{image}", "--image", "{image}"],
     "give one mask per image"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_exit_code_2_and_no_output(tiny_model_dir, files, capsys, extra, message):
    extra = [e.format(dir=files["dir"], mask=files["mask"], image=files["image"]) for e in extra]
    rc, out = _learn(tiny_model_dir, files, *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("clic: error: ")
    assert not out.exists() and not out.with_suffix(".log.jsonl").exists()
    assert not list(files["dir"].glob(".*.tmp"))


def test_bad_model_and_concept_files(files, capsys, tmp_path):
    assert main(["learn", "--model", str(tmp_path), "--image", files["image"], "--mask", files["mask"],
                 "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    assert main(["info", str(tmp_path / "bad.safetensors")]) == 2
    assert "not a valid safetensors" in capsys.readouterr().err


def test_export_cli(tiny_model_dir, files, capsys):
    rc, out = _learn(tiny_model_dir, files)
    assert rc == 0
    assert main(["export-diffusers", str(out), str(files["dir"] / "export"), "--model", tiny_model_dir]) == 0
    assert (files["dir"] / "export" / "pytorch_custom_diffusion_weights.safetensors").exists()


def test_make_model_cli(tmp_path, capsys):
    assert main(["make-model", "tiny", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "unet" / "config.json").exists()
    assert main(["make-model", "tiny", str(tmp_path / "m")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["make-model", "huge", str(tmp_path / "n")]) == 2


def test_atomic_writes_have_plain_file_permissions_and_leave_nothing_on_error(tmp_path):
    """Outputs get the permissions ``open(path, "w")`` gives (not mkstemp's owner-only 0600); a failed write leaves
    neither the file nor its temporary."""
    import os
    import stat

    from clic.fileio import atomic_path

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_path(tmp_path / "out.txt") as tmp:
        open(tmp, "w").write("y")
    assert stat.S_IMODE(os.stat(tmp_path / "out.txt").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "failed.txt") as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "plain.txt"]


def test_a_reader_that_goes_away_ends_the_command_quietly(concept_path):
    """`clic info c.safetensors | head`: the pipe closes before clic writes; no traceback, SIGPIPE's exit code."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "clic", "info", str(concept_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                  # before clic has started: its first write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err
