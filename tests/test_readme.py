"""The README's commands and code, as written: every `clic` command parses and names files that exist; the "Use"
commands run in order on the tiny model (learning twice in one process included); the Python blocks run (twice, for
the pipeline's), and the diffusers-only recipe gives clic's image with the trained K/V really applied.

What a run changes, and only that: ``--model`` and fewer steps (appended, so the README's own values are parsed
first), the hub id, fp16 and "cuda" in the Python blocks (CPU here). Commands that need a GPU, a manifest or an
inpainting model are parsed here and run by the test named in ``RUN_ELSEWHERE``."""

import re
import shlex
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = ROOT / "src" / "clic" / "assets" / "examples"

#: the commands not run here, and the test that runs them
RUN_ELSEWHERE = {"bench": "tests/test_bench.py", "benchmark": "tests/test_benchmark.py",
                 "realfill": "tests/test_baselines.py", "discover": "tests/test_roi.py",
                 "baselines": "tests/test_baselines.py", "make-model": "tests/test_sdxl.py", "ui": "tests/test_ui.py"}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


#: the shell variables the README sets (``EX=src/clic/assets/examples``), for the blocks that use them later
SHELL = {m[0]: str(ROOT / m[1]) for m in re.findall(r"^(\w+)=(\S+)", README, flags=re.M)}


def commands(block: str) -> list[list[str]]:
    """The block's `clic` commands as argument lists (continuation lines joined, comments and $EX resolved)."""
    text = block.replace("\\\n", " ")
    out, env = [], dict(SHELL)
    for line in text.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if m := re.fullmatch(r"(\w+)=(\S+)", line):
            env[m[1]] = str(ROOT / m[2])
        elif line.startswith("clic "):
            out.append([re.sub(r"\$(\w+)", lambda v: env[v[1]], a) for a in shlex.split(line)[1:]])
    return out


def block_with(*needles: str) -> str:
    """The one bash block that holds every needle."""
    (block,) = [b for b in blocks("bash") if all(n in b for n in needles)]
    return block


def test_every_command_parses_and_names_shipped_images(capsys, monkeypatch):
    import torch

    import clic.cli.validate
    from clic.cli import build_parser

    # --device is checked against this machine when parsed; the README's GPU commands name a device it may lack
    monkeypatch.setattr(clic.cli.validate, "check_device", torch.device)
    argvs = [argv for block in blocks("bash") for argv in commands(block)]
    assert len(argvs) >= 25
    for argv in argvs:
        build_parser(argv).parse_args(argv)                  # an unknown option or a bad value exits here
        for arg in argv:
            if arg.endswith(".png") and not arg.startswith("out/"):     # out/: what an earlier command wrote
                assert arg.startswith(str(EXAMPLES)) and Path(arg).is_file(), (argv, arg)   # the shipped examples
    run_here = {"learn", "transfer", "generate", "match", "export-diffusers", "info", "evaluate"}
    assert {argv[0] for argv in argvs} <= run_here | set(RUN_ELSEWHERE)
    for command, test in RUN_ELSEWHERE.items():
        assert f'main(["{command}"' in (ROOT / test).read_text() or f'"clic", "{command}"' in (ROOT / test).read_text()
    assert "stool" not in README and "lent" not in README.split()


def _fewer_steps(argv: list[str], model: str) -> list[str]:
    command = argv[0]
    extra = {"learn": ["--steps", "2", "--model", model], "transfer": ["--steps", "12", "--model", model],
             "generate": ["--steps", "3", "--num", "2", "--model", model],
             "match": ["--steps", "2", "--model", model], "export-diffusers": [], "info": [],
             "evaluate": ["--no-lpips"]}[command]
    return [*argv, *extra, "-q"] if command in ("learn", "transfer", "generate") else [*argv, *extra]


def test_use_commands_run_in_order(tiny_model_dir, tmp_path, monkeypatch):
    """The "Use" block, top to bottom, in one process (the first learning command twice: a second run in the same
    process must not find its placeholder in the vocabulary), then evaluate on the transfer's result."""
    from clic.cli import main

    monkeypatch.chdir(tmp_path)
    use = commands(block_with("clic learn", "clic match", "clic export-diffusers chair.safetensors exported/"))
    first_learn = use[0]
    for argv in [first_learn, *use, *[a for a in commands(block_with("clic evaluate")) if a[0] == "evaluate"]]:
        assert main(_fewer_steps(argv, tiny_model_dir)) == 0, argv
    assert (tmp_path / "out" / "transfer" / "seed0.png").is_file()
    assert (tmp_path / "out" / "t_auto" / "mask_auto.png").is_file()
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "clic_concept.json", "learned_embeds.safetensors", "pytorch_custom_diffusion_weights.safetensors"]


def _python(block: str, model: str, steps: bool = True) -> str:
    code = block.replace('"CompVis/stable-diffusion-v1-4"', repr(model)).replace("torch.float16", "torch.float32")
    code = code.replace('.to("cuda")', '.to("cpu")').replace('EX = "src/', f'EX = "{ROOT}/src/')
    if steps:
        code = code.replace("steps=500", "steps=2").replace("num_inference_steps=50", "num_inference_steps=4")
    return code


def test_pipeline_block_runs_twice_in_one_process(tiny_model_dir, tmp_path, monkeypatch):
    (block,) = [b for b in blocks("python") if "ClicPipeline.from_pretrained" in b]
    monkeypatch.chdir(tmp_path)
    code = _python(block, tiny_model_dir)
    for _ in range(2):
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
        target = Image.open(ROOT / "src/clic/assets/examples/toy_target.png")
        assert scope["edited"].images[0].size == target.size and len(scope["new"].images) == 4   # the target's size
    assert (tmp_path / "chair.safetensors").is_file() and (tmp_path / "edited_attention.png").is_file()


def test_diffusers_only_recipe_is_clic_generation(tiny_model_dir, concept_path, tmp_path, monkeypatch):
    """The README's diffusers-only recipe on an exported concept (its K/V moved well away from the base model's, so
    that they matter) gives `clic generate --base-steps 0`'s image; without the processors it would not."""
    from test_stock import stock, strong

    from clic import ClicPipeline, load_concept
    from clic.concept import Concept
    from clic.stock import export_diffusers

    concept = strong(Concept.load(concept_path))
    monkeypatch.chdir(tmp_path)
    export_diffusers(concept, "exported")
    (block,) = [b for b in blocks("python") if "set_attn_processor" in b]
    scope = {}
    exec(compile(_python(block, tiny_model_dir), "README.md", "exec"), scope)
    pipe = scope["pipe"]
    assert sum(type(p).__name__ == "CustomDiffusionAttnProcessor2_0" for p in pipe.unet.attn_processors.values()) \
        == len(concept.layers)
    theirs = pipe("a photo of a table, with <v*> style", num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images

    ours = ClicPipeline.from_pretrained(tiny_model_dir)
    ours.set_progress_bar_config(disable=True)
    ours.load_concept(concept)
    out = ours.generate(object_class="table", base_steps=0, num_inference_steps=4, output_type="pt",
                        generator=torch.Generator().manual_seed(0))
    assert out.prompt == "a photo of a table, with <v*> style"
    torch.testing.assert_close(theirs, out.images, rtol=1e-4, atol=1e-4)

    # the token alone (what an unapplied weights file gives) is another image
    token_only = stock(tiny_model_dir)
    token_only.load_textual_inversion(list(concept.embeddings), token=list(concept.tokens))
    alone = token_only("a photo of a table, with <v*> style", num_inference_steps=4, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images
    assert (alone - theirs).abs().max() > 1e-2

    # and the one-call route of the same section
    (short,) = [b for b in blocks("python") if "tokens = load_concept(pipe" in b]
    scope = {"pipe": stock(tiny_model_dir), "load_concept": load_concept}
    Path("chair.safetensors").write_bytes(Path(concept_path).read_bytes())
    exec(compile(short, "README.md", "exec"), scope)
    assert scope["tokens"] == ["<v*>"]


def test_install_lines_name_real_extras():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r'pip install -e "\.\[([\w-]+)\]"', README):
        assert extra in extras, extra
    assert any(d.startswith("open_clip_torch") for d in extras["make-model"])
    # the newcomer's two commands, unchanged
    assert "bash scripts/demo.sh     # the main job: the offline demo, outputs in out/demo/" in README
    assert "bash scripts/test.sh     # the test suite (what CI runs)" in README
