"""Hostile inputs over every command: each class of failure ends in exit code 2, one line naming the culprit, and
nothing half-written (README, "Reliability"). The full disk is a fake writer that raises ENOSPC part-way (and once
the kernel's own limit on file size, in a subprocess)."""

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clic.cli import main
from clic.errors import ConceptFileError, InputError, NonFiniteError

EXAMPLES = Path(__file__).parent.parent / "src" / "clic" / "assets" / "examples"
IMAGE, MASK = EXAMPLES / "chair.png", EXAMPLES / "chair_mask.png"
TARGET, TARGET_MASK = EXAMPLES / "toy_target.png", EXAMPLES / "toy_target_mask.png"


def run(capsys, *argv):
    """``clic ARGV`` in this process: (exit code, stderr)."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(rc, err, *culprits):
    """Exit code 2 and a single line ``clic: error: ...`` that names every culprit."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clic: error: "), err
    for c in culprits:
        assert str(c) in lines[0], (c, lines[0])
    return lines[0]


def left_in(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporaries and locks included."""
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    from clic.cli import discover, export, learn, match, transfer

    def loaded(*a, **kw):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module in (learn, transfer, match, discover, export):         # generate's is transfer's
        monkeypatch.setattr(module, "load_backbone", loaded)


def learn_args(model, out, *extra):
    return ["learn", "--model", model, "--device", "cpu", "--steps", "2", "-q", "--object-class", "chair",
            "--image", IMAGE, "--mask", MASK, "--out", out, *extra]


def transfer_args(model, concept, out, *extra):
    return ["transfer", concept, "--model", model, "--device", "cpu", "--steps", "3", "-q", "--target", TARGET,
            "--mask", TARGET_MASK, "--out", out, *extra]


def generate_args(model, concept, out, *extra):
    return ["generate", concept, "--model", model, "--device", "cpu", "--steps", "2", "-q", "--out", out, *extra]


def concept_variant(concept_path, path, meta=None, tensors=None):
    """A copy of a concept file with its metadata (the parsed 'clic' value -> a JSON text) or tensors changed."""
    t = load_file(str(concept_path))
    with safe_open(str(concept_path), "pt") as f:
        metadata = dict(f.metadata())
    if meta is not None:
        metadata["clic"] = meta(json.loads(metadata["clic"]))
    if tensors is not None:
        tensors(t)
    save_file(t, str(path), metadata=metadata)
    return path


def png_header(path, width, height):
    """A PNG whose header claims ``width x height`` (the pixels are missing: what a bomb's header says is enough)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------- 1. non-finite numbers


@pytest.mark.parametrize("command,option,value", [
    ("transfer", "--eta", "inf"), ("transfer", "--guidance-scale", "nan"), ("transfer", "--ddim-eta", "inf"),
    ("generate", "--guidance-scale", "inf"), ("learn", "--lr", "nan"), ("learn", "--alpha", "nan")])
def test_non_finite_options_are_refused_before_any_work(tiny_model_dir, concept_path, tmp_path, capsys, no_model,
                                                        command, option, value):
    out = tmp_path / "out"
    argv = {"transfer": transfer_args(tiny_model_dir, concept_path, out),
            "generate": generate_args(tiny_model_dir, concept_path, out),
            "learn": learn_args(tiny_model_dir, tmp_path / "c.safetensors")}[command]
    one_line_error(*run(capsys, *argv, option, value), option, "finite")
    assert left_in(tmp_path) == []


@pytest.mark.parametrize("command", ["transfer", "generate", "info", "export-diffusers"])
def test_a_concept_holding_nan_is_refused(tiny_model_dir, concept_path, tmp_path, capsys, no_model, command):
    bad = concept_variant(concept_path, tmp_path / "nan.safetensors",
                          tensors=lambda t: t["token_embeddings"].fill_(float("nan")))
    out = tmp_path / "out"
    argv = {"transfer": transfer_args(tiny_model_dir, bad, out), "generate": generate_args(tiny_model_dir, bad, out),
            "info": ["info", bad], "export-diffusers": ["export-diffusers", bad, out]}[command]
    one_line_error(*run(capsys, *argv), bad, "token_embeddings", "NaN")
    assert not out.exists()


def test_latents_that_blow_up_stop_the_loop_naming_the_step(tiny_model_dir, concept_path, tmp_path, capsys):
    """A finite but huge step size overflows the latents: the loop stops before any image is made."""
    out = tmp_path / "t"
    line = one_line_error(*run(capsys, *transfer_args(tiny_model_dir, concept_path, out, "--eta", "1e30")),
                          "became NaN or inf at denoising step", "--eta")
    assert "step 1;" in line                       # t_start = 1 of 3 steps: the first guided step
    out = tmp_path / "g"
    one_line_error(*run(capsys, *generate_args(tiny_model_dir, concept_path, out, "--guidance-scale", "1e38")),
                   "became NaN or inf at denoising step")
    assert left_in(tmp_path) == []


def test_the_finite_watch_reads_the_device_once():
    from clic.checks import FiniteWatch

    watch = FiniteWatch("x")
    for step in range(5):
        watch.see(torch.full((2, 3), float("nan") if step >= 3 else 1.0), step)
    with pytest.raises(NonFiniteError, match="at denoising step 3"):
        watch.check()
    FiniteWatch("nothing seen").check()


def test_pixels_outside_the_mask_stay_the_target_whatever_the_inside_holds():
    from clic.transfer import composite, feather_mask, paste_back

    target = torch.rand(3, 32, 48) * 2 - 1
    mask = torch.zeros(1, 32, 48)
    mask[:, 10:20, 20:30] = 1
    decoded = torch.full((2, 3, 32, 32), float("nan"))
    out = paste_back(decoded, target, mask, radius=2)
    outside = feather_mask(mask, 2).expand(2, 3, -1, -1) == 0
    assert torch.equal(out[outside], target[None].expand(2, -1, -1, -1)[outside])
    alpha = torch.zeros(1, 1, 4, 4)
    assert torch.equal(composite(torch.full((1, 3, 4, 4), float("inf")), target[:, :4, :4][None], alpha),
                       target[:, :4, :4][None])


def test_a_manifest_with_an_infinite_eta_is_refused(tmp_path, capsys, tiny_model_dir):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"model: {tiny_model_dir}\nmethods: [clic]\nablations: {{eta: [.inf]}}\ncases:\n"
                        f"  - {{id: c, source: {IMAGE}, source_mask: {MASK}, target: {TARGET}, "
                        f"target_mask: {TARGET_MASK}, object_class: chair}}\n")
    one_line_error(*run(capsys, "benchmark", manifest, "--out", tmp_path / "b"), "clic-eta=inf", "--eta", "finite")
    assert not (tmp_path / "b" / "results.csv").exists()


# ---------------------------------------------------------------------------------------------- 2. a full disk


@pytest.fixture
def full_disk(monkeypatch):
    """Every writer of the package (PIL, safetensors, text) writes half a file, then raises ENOSPC, once ``after``
    files have been written whole: ``full_disk(after)`` (again: a new count) returns the files written whole."""
    import clic.concept
    import clic.runs
    import clic.stock

    written, limit = [], {}

    def full(path):
        if len(written) >= limit["after"]:
            Path(path).write_bytes(b"half")
            return True
        written.append(str(path))
        return False

    def arm(after: int):
        written.clear()
        limit["after"] = after
        if limit.get("armed"):
            return written
        limit["armed"] = True

        real_save = Image.Image.save

        def pil_save(self, fp, *a, **kw):
            if full(fp):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(self, fp, *a, **kw)

        def tensors_save(real):
            def save(tensors, path, *a, **kw):
                if full(path):
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                return real(tensors, path, *a, **kw)
            return save

        real_write_text = Path.write_text

        def write_text(self, *a, **kw):
            if full(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real_write_text(self, *a, **kw)

        monkeypatch.setattr(Image.Image, "save", pil_save)
        monkeypatch.setattr(clic.concept, "save_file", tensors_save(clic.concept.save_file))
        monkeypatch.setattr(clic.runs, "save_file", tensors_save(clic.runs.save_file))
        monkeypatch.setattr(clic.stock, "save_file", tensors_save(clic.stock.save_file))
        monkeypatch.setattr(Path, "write_text", write_text)
        return written

    return arm


def test_full_disk_during_transfer_leaves_no_image(tiny_model_dir, concept_path, tmp_path, capsys, full_disk):
    written = full_disk(after=2)
    one_line_error(*run(capsys, *transfer_args(tiny_model_dir, concept_path, tmp_path / "t", "--num", "8")),
                   tmp_path / "t", "No space left on device")
    assert len(written) == 2 and left_in(tmp_path) == []          # 2 of 8 images were written, then removed


def test_full_disk_during_export_leaves_no_file(tiny_model_dir, concept_path, tmp_path, capsys, full_disk):
    full_disk(after=1)                                             # the weights fit, the embeddings do not
    one_line_error(*run(capsys, "export-diffusers", concept_path, tmp_path / "x", "--model", tiny_model_dir),
                   tmp_path / "x", "No space left on device")
    assert left_in(tmp_path) == []
    full_disk(after=10**6)     # and an export of the same concept afterwards writes all three
    assert run(capsys, "export-diffusers", concept_path, tmp_path / "x", "--model", tiny_model_dir)[0] == 0
    assert left_in(tmp_path / "x") == ["clic_concept.json", "learned_embeds.safetensors",
                                       "pytorch_custom_diffusion_weights.safetensors"]


@pytest.mark.parametrize("after,culprit", [(0, "c.safetensors.ckpt"), (1, "c.safetensors")])
def test_full_disk_during_learning_is_one_line(tiny_model_dir, tmp_path, capsys, full_disk, after, culprit):
    """The checkpoint (written first) or the concept meet the full disk: neither is left half-written."""
    full_disk(after)
    out = tmp_path / "c.safetensors"
    one_line_error(*run(capsys, *learn_args(tiny_model_dir, out, "--steps", "3", "--checkpoint-every", "2")),
                   tmp_path / culprit, "No space left on device")
    assert not out.exists() and not [n for n in left_in(tmp_path) if n.endswith((".tmp", ".lock"))]


def test_full_disk_while_writing_the_log_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import clic.runs

    class FullFile:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(clic.runs, "open", FullFile, raising=False)
    out = tmp_path / "c.safetensors"
    one_line_error(*run(capsys, *learn_args(tiny_model_dir, out)), "c.log.jsonl", "cannot write the log",
                   "No space left on device")
    assert not out.exists()


def test_a_real_write_failure_of_the_kernel(tiny_model_dir, concept_path, tmp_path):
    """The kernel's limit on file size (EFBIG, as a full disk's ENOSPC): the concept file cannot be written."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))   # the log fits, the concept does not

    out = tmp_path / "c.safetensors"
    proc = subprocess.run([sys.executable, "-m", "clic", *map(str, learn_args(tiny_model_dir, out))],
                          preexec_fn=limit, capture_output=True, text=True, timeout=300)
    one_line_error(proc.returncode, proc.stderr, out, "File too large")
    assert not out.exists() and not [n for n in left_in(tmp_path) if n.endswith((".tmp", ".lock"))]


# ---------------------------------------------------------------------------------------------- 3. resume and two runs


def test_resume_skips_a_log_line_cut_short(tiny_model_dir, tmp_path):
    from clic.config import learn_config
    from clic.learn import learn
    from conftest import random_image, shared_backbone, square_mask

    cfg = learn_config(object_class="chair", steps=4, checkpoint_every=2, lr=1e-3)
    out, log = tmp_path / "c.safetensors", tmp_path / "c.log.jsonl"

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn(shared_backbone(tiny_model_dir), [random_image()], [square_mask()], cfg, out_path=out, log_path=log,
              progress=False, callback=kill)
    log.write_text(log.read_text()[:-9])                        # killed while writing step 3's line
    result = learn(shared_backbone(tiny_model_dir), [random_image()], [square_mask()], cfg, out_path=out,
                   log_path=log, resume=True, progress=False)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_broken_line_inside_the_log_is_one_line(tmp_path):
    from clic.errors import TrainingError
    from clic.runs import read_log

    log = tmp_path / "c.log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(TrainingError, match="line 2 is not a log record"):
        read_log(log)


def test_a_second_run_on_the_same_output_is_refused(tiny_model_dir, concept_path, tmp_path, capsys, no_model):
    from clic.cli.validate import exclusive

    out = tmp_path / "c.safetensors"
    with exclusive(out):                                          # the first run, still going
        one_line_error(*run(capsys, *learn_args(tiny_model_dir, out)), out, "another clic run is writing it")
        with exclusive(tmp_path / "t"):
            one_line_error(*run(capsys, *transfer_args(tiny_model_dir, concept_path, tmp_path / "t")),
                           "another clic run")
    assert left_in(tmp_path) == []                                # the locks went with the runs


# ---------------------------------------------------------------------------------------------- 4. concept metadata


BAD_CONCEPTS = {
    "a JSON list": (dict(meta=lambda m: "[1, 2]"), "an array, not a JSON object"),
    "a JSON string": (dict(meta=lambda m: '"hello"'), "a string, not a JSON object"),
    "no tokens": (dict(meta=lambda m: json.dumps({k: v for k, v in m.items() if k != "tokens"})), "'tokens'"),
    "null tokens": (dict(meta=lambda m: json.dumps({**m, "tokens": None})), "'tokens' must be a list"),
    "an unknown tensor": (dict(tensors=lambda t: t.__setitem__("attn.garbage", t["token_embeddings"].clone())),
                          "unknown tensor 'attn.garbage'"),
    "integer embeddings": (dict(tensors=lambda t: t.__setitem__("token_embeddings", t["token_embeddings"].int())),
                           "not a float tensor"),
    "a 3-d weight": (dict(tensors=lambda t: _unsqueeze(t, "to_k.weight")), "expected 2"),
}


def _unsqueeze(tensors, suffix):
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = tensors[key][None]


@pytest.mark.parametrize("command", ["info", "transfer", "generate", "export-diffusers"])
@pytest.mark.parametrize("bad", list(BAD_CONCEPTS))
def test_malformed_concept_files_are_one_line(tiny_model_dir, concept_path, tmp_path, capsys, no_model, command,
                                              bad):
    change, message = BAD_CONCEPTS[bad]
    path = concept_variant(concept_path, tmp_path / "bad.safetensors", **change)
    out = tmp_path / "out"
    argv = {"info": ["info", path], "transfer": transfer_args(tiny_model_dir, path, out),
            "generate": generate_args(tiny_model_dir, path, out), "export-diffusers": ["export-diffusers", path, out]}
    one_line_error(*run(capsys, *argv[command]), path, message)
    assert not out.exists()


def test_the_page_reports_a_malformed_upload_in_one_line(concept_path, tmp_path):
    from clic.ui import _load_concept, message

    path = concept_variant(concept_path, tmp_path / "bad.safetensors", meta=lambda m: "[1, 2]")
    with pytest.raises(ConceptFileError) as info:
        _load_concept(path)
    assert "\n" not in message(info.value) and "not a JSON object" in message(info.value)


# ---------------------------------------------------------------------------------------------- 5. decompression bombs


@pytest.mark.parametrize("side,message", [(30000, "decompression bomb"), (10000, "10000x10000 (100 megapixels)")])
@pytest.mark.parametrize("command", ["learn", "transfer", "match", "evaluate"])
def test_decompression_bombs_are_refused_unread(tiny_model_dir, concept_path, tmp_path, capsys, no_model, command,
                                                side, message):
    bomb = png_header(tmp_path / "bomb.png", side, side)
    out = tmp_path / "out"
    argv = {"learn": ["learn", "--image", bomb, "--mask", bomb, "--out", tmp_path / "c.safetensors"],
            "transfer": transfer_args(tiny_model_dir, concept_path, out, "--target", bomb),
            "match": ["match", "--matcher", concept_path, "--target", bomb, "--out", out],
            "evaluate": ["evaluate", "--result", bomb, "--target", TARGET, "--mask", TARGET_MASK, "--no-lpips"]}
    one_line_error(*run(capsys, *argv[command]), bomb, message, "limit is 50 megapixels")
    assert left_in(tmp_path) == ["bomb.png"]


def test_the_page_refuses_a_huge_image():
    from clic.ui import editor_image

    huge = np.broadcast_to(np.zeros(3, np.uint8), (8000, 7000, 3))      # 56 megapixels, no memory
    with pytest.raises(InputError, match="7000x8000 .56 megapixels.; the limit is 50"):
        editor_image({"background": huge, "layers": []})


# ---------------------------------------------------------------------------------------------- 6. unbounded sizes


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--size", "100000"], "--size must be in 16..4096"),
    (["evaluate", "--size", "-5"], "--size must be in 16..4096"),
    (["evaluate", "--size", "0"], "--size must be in 16..4096"),
    (["generate", "--num", "1000000000"], "at most 256"),
    (["transfer", "--seeds", *map(str, range(300))], "at most 256"),
    (["transfer", "--feather", "1000000000"], "--feather must be in 0..1024 pixels"),
])
def test_sizes_and_counts_are_bounded(tiny_model_dir, concept_path, tmp_path, capsys, no_model, argv, message):
    command, *extra = argv
    full = {"evaluate": ["evaluate", "--result", TARGET, "--target", TARGET, "--mask", TARGET_MASK, "--no-lpips"],
            "generate": generate_args(tiny_model_dir, concept_path, tmp_path / "out"),
            "transfer": transfer_args(tiny_model_dir, concept_path, tmp_path / "out")}[command]
    one_line_error(*run(capsys, *full, *extra), message)
    assert left_in(tmp_path) == []


def test_more_steps_than_the_model_has_is_one_line(tiny_model_dir, concept_path, tmp_path, capsys):
    one_line_error(*run(capsys, *transfer_args(tiny_model_dir, concept_path, tmp_path / "t", "--steps", "100000")),
                   "--steps 100000 is more than the model's 1000 training timesteps")
    assert left_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------- 7. outputs first


@pytest.mark.parametrize("case", ["learn --log", "learn --save-maps", "learn --save-maps is a file",
                                  "transfer --out", "generate --out", "discover --out", "match --save-matcher",
                                  "export-diffusers into a file", "export-diffusers under a file"])
def test_unusable_outputs_are_refused_before_any_model_loads(tiny_model_dir, concept_path, tmp_path, capsys,
                                                             no_model, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    under = a_file / "sub"                                         # a place no one can write: under a file
    out = tmp_path / "c.safetensors"
    argv = {
        "learn --log": learn_args(tiny_model_dir, out, "--log", under / "log.jsonl"),
        "learn --save-maps": learn_args(tiny_model_dir, out, "--save-maps", under),
        "learn --save-maps is a file": learn_args(tiny_model_dir, out, "--save-maps", a_file),
        "transfer --out": transfer_args(tiny_model_dir, concept_path, under),
        "generate --out": generate_args(tiny_model_dir, concept_path, under),
        "discover --out": ["discover", "--image", IMAGE, "--image", IMAGE, "--out", under, "--model",
                           tiny_model_dir],
        "match --save-matcher": ["match", "--concept", concept_path, "--source", IMAGE, "--mask", MASK, "--target",
                                 TARGET, "--out", tmp_path / "m", "--save-matcher", under / "w.safetensors"],
        "export-diffusers into a file": ["export-diffusers", concept_path, a_file],
        "export-diffusers under a file": ["export-diffusers", concept_path, under],
    }[case]
    one_line_error(*run(capsys, *argv), a_file)
    assert left_in(tmp_path) == ["a_file"] and a_file.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_read_only_folder_is_refused_before_any_model_loads(tiny_model_dir, concept_path, tmp_path, capsys,
                                                               no_model):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    one_line_error(*run(capsys, *transfer_args(tiny_model_dir, concept_path, ro / "t")), ro, "cannot write")



@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
@pytest.mark.parametrize("command", ["transfer", "generate", "discover", "export-diffusers", "learn"])
def test_a_place_nobody_may_write_is_refused_before_any_model_loads(tiny_model_dir, concept_path, tmp_path, capsys,
                                                                   no_model, command):
    """/proc takes no new files, whoever asks (root too, whom permission bits do not stop): tried, not guessed."""
    out = Path("/proc/clic-out")
    argv = {"transfer": transfer_args(tiny_model_dir, concept_path, out),
            "generate": generate_args(tiny_model_dir, concept_path, out),
            "discover": ["discover", "--image", IMAGE, "--image", IMAGE, "--out", out, "--model", tiny_model_dir],
            "export-diffusers": ["export-diffusers", concept_path, out],
            "learn": learn_args(tiny_model_dir, out / "c.safetensors")}[command]
    one_line_error(*run(capsys, *argv), out, "cannot write in /proc")
    assert not out.exists() and left_in(tmp_path) == []

# ---------------------------------------------------------------------------------------------- 8. manifests


def _manifest(tmp_path, model, **changes):
    data = {"model": model, "methods": ["clic"], "metrics": ["psnr"],
            "cases": [{"id": "c", "source": str(IMAGE), "source_mask": str(MASK), "target": str(TARGET),
                       "target_mask": str(TARGET_MASK), "object_class": "chair"}], **changes}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case,message", [
    ({"learn": "abc"}, "learn: must be a mapping, got 'abc'"),
    ({"metrics": 5}, "metrics: must be a list, got 5"),
    ({"methods": 5}, "methods: must be a list, got 5"),
    ({"ablations": {"eta": 5}}, "ablations: a mapping with"),
    ({"transfer": {"seeds": "abc"}}, "--seeds must be a list of integers, got 'abc'"),
    ({"methods": [{"name": "x", "method": ["clic"]}]}, "unknown method ['clic']"),
    ({"cases": [{"id": "c", "source": 5}]}, "source must be text"),
], ids=lambda v: str(v)[:30])
def test_manifests_of_the_wrong_types_are_one_line(tmp_path, capsys, tiny_model_dir, case, message):
    path = _manifest(tmp_path, tiny_model_dir, **case)
    one_line_error(*run(capsys, "benchmark", path, "--out", tmp_path / "b"), path, message)
    assert not (tmp_path / "b" / "results.csv").exists()


@pytest.mark.parametrize("kind", ["alias bomb", "not UTF-8", "too large", "nested too deeply"])
def test_hostile_manifest_files_are_one_line(tmp_path, capsys, kind):
    path = tmp_path / ("m.json" if kind == "nested too deeply" else "m.yaml")
    if kind == "alias bomb":                                      # 1 KB that expands to 9^9 items
        lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
        lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
        path.write_text("\n".join(lines) + "\nmethods: [*i]\ncases: []\n")
        message = "aliases (*a) are not allowed"
    elif kind == "not UTF-8":
        path.write_bytes(b"name: caf\xe9\ncases: []\n")
        message = "not UTF-8 text"
    elif kind == "too large":
        path.write_text("cases: []\n" + "# padding\n" * 200_000)
        message = "at most 1024 KB"
    else:
        path.write_text("[" * 100_000 + "]" * 100_000)
        message = "nested too deeply"
    one_line_error(*run(capsys, "benchmark", path, "--out", tmp_path / "b"), path, message)


# ---------------------------------------------------------------------------------------------- 9. inputs overwritten


def test_an_output_is_never_an_input(tiny_model_dir, concept_path, tmp_path, capsys, no_model):
    folder = tmp_path / "t"
    folder.mkdir()
    target = folder / "seed0.png"
    target.write_bytes(TARGET.read_bytes())
    one_line_error(*run(capsys, "transfer", concept_path, "--target", target, "--mask", TARGET_MASK, "--out", folder),
                   target, "--target")
    image = tmp_path / "image.safetensors"                        # an image, whatever its name
    image.write_bytes(IMAGE.read_bytes())
    one_line_error(*run(capsys, "learn", "--image", image, "--mask", MASK, "--out", image), image, "--image")
    mask = tmp_path / "mask.png"
    mask.write_bytes(MASK.read_bytes())
    one_line_error(*run(capsys, "learn", "--image", IMAGE, "--mask", mask, "--out", tmp_path / "c.safetensors",
                        "--log", mask), mask, "--mask")
    assert target.read_bytes() == TARGET.read_bytes() and image.read_bytes() == IMAGE.read_bytes()
    assert mask.read_bytes() == MASK.read_bytes()


# ---------------------------------------------------------------------------------------------- 10. options


@pytest.mark.parametrize("argv,message", [
    (["--seed", str(2**64)], "--seed must be in 0..4294967295"),
    (["--seed", "-1"], "--seed must be in 0.."),
    (["--device", "tpu"], "unknown device 'tpu'; available here:"),
])
def test_options_out_of_range_are_one_line(tiny_model_dir, tmp_path, capsys, no_model, argv, message):
    one_line_error(*run(capsys, *learn_args(tiny_model_dir, tmp_path / "c.safetensors", *argv)), message)
    assert left_in(tmp_path) == []


def test_seeds_past_the_last_one_are_refused(tiny_model_dir, concept_path, tmp_path, capsys, no_model):
    one_line_error(*run(capsys, *generate_args(tiny_model_dir, concept_path, tmp_path / "g", "--seeds",
                                               str(2**32 - 2), "--num", "4")), "goes past the largest seed")



def test_seeds_torch_would_repeat_are_refused(tiny_model_dir, concept_path, tmp_path, capsys, no_model):
    """torch's CPU generator keeps 32 bits of a seed: 2^63 + 1 (and 2^32 + 1) draw what 1 draws. The largest seed
    whose draws are its own runs; the next is refused, in the library too."""
    from clic.config import GenerateConfig, LearnConfig

    same = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (1, 2**32 + 1, 2**63 + 1)]
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])      # why the bound is 2^32 - 1
    for seed in (2**32, 2**63 + 1):
        one_line_error(*run(capsys, *generate_args(tiny_model_dir, concept_path, tmp_path / "g", "--seeds",
                                                   str(seed))), f"--seeds must be in 0..{2**32 - 1}", str(seed))
    with pytest.raises(InputError, match="--seed must be in 0..4294967295"):
        LearnConfig(object_class="chair", seed=2**63 + 1).check()
    with pytest.raises(InputError, match="--seeds must be in 0..4294967295"):
        GenerateConfig(seeds=(0, 2**63 + 1)).check()
    assert left_in(tmp_path) == []


def test_the_largest_seed_runs(tiny_model_dir, concept_path, tmp_path, capsys):
    out = tmp_path / "g"
    assert run(capsys, *generate_args(tiny_model_dir, concept_path, out, "--seeds", "1", str(2**32 - 1)))[0] == 0
    assert not np.array_equal(np.asarray(Image.open(out / "seed1.png")),
                              np.asarray(Image.open(out / f"seed{2**32 - 1}.png")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_the_alternatives(tiny_model_dir, tmp_path, capsys, no_model):
    one_line_error(*run(capsys, *learn_args(tiny_model_dir, tmp_path / "c.safetensors", "--device", "cuda")),
                   "device 'cuda'", "available here: cpu")


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys, monkeypatch):
    pytest.importorskip("gradio")
    import clic.cli.ui

    monkeypatch.setattr(clic.cli.ui, "Workbench", None)           # calling it would fail the test
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_error(*run(capsys, "ui", "--port", port), f"--port {port}", "in use")


# ---------------------------------------------------------------------------------------------- 11. statistics


def test_intervals_use_students_t_at_every_n():
    from clic_lab.stats import mean_ci, t_quantile95

    # reference quantiles (scipy.stats.t.ppf(0.975, df))
    for df, t in [(1, 12.706204736174694), (4, 2.7764451051977934), (31, 2.039513446396408),
                  (49, 2.0095752371292392), (100, 1.9839715185235518), (5000, 1.9604385517065073)]:
        assert t_quantile95(df) == pytest.approx(t, rel=1e-12, abs=1e-12)
    values = [float(v) for v in range(50)]
    mean, lo, hi = mean_ci(values)
    sd = float(np.std(values, ddof=1))
    assert hi - mean == pytest.approx(2.0095752371292392 * sd / 50**0.5, rel=1e-12)


# ---------------------------------------------------------------------------------------------- weaker ones


@pytest.mark.parametrize("kind,message", [("folder", "is a folder, not a file"), ("fifo", "is a FIFO"),
                                          ("device", "is a character device")])
def test_what_is_not_a_regular_file_says_what_it_is(tmp_path, capsys, no_model, kind, message):
    path = {"folder": tmp_path / "d", "fifo": tmp_path / "f.png", "device": Path("/dev/zero")}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    one_line_error(*run(capsys, "learn", "--image", path, "--mask", MASK, "--out", tmp_path / "c.safetensors"),
                   path, message)


def test_page_uploads_are_capped(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import httpx

    import clic.ui

    monkeypatch.setattr(clic.ui, "MAX_UPLOAD_BYTES", 1000)
    app = clic.ui.launch(clic.ui.Workbench(tiny_model_dir, "cpu", workdir=tmp_path), block=False)
    try:
        sizes = {n: httpx.post(app.local_url + "gradio_api/upload",
                               files={"files": ("c.safetensors", b"x" * n)}).status_code for n in (500, 2000)}
    finally:
        app.close()
    assert sizes == {500: 200, 2000: 413}
