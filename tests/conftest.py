"""Shared fixtures: tiny random-init models built offline once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The tiny models' ops are too small to gain from threads (one thread is faster here), and one thread keeps a
# shared machine usable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from clic.builder import make_model

    return str(make_model("tiny", tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory):
    from clic.builder import make_model

    return str(make_model("tiny-sd2", tmp_path_factory.mktemp("models") / "tiny-sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory):
    from clic.builder import make_model

    return str(make_model("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_dir(tmp_path_factory):
    from clic.builder import make_model

    return str(make_model("tiny-sdxl-inpaint", tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint"))


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory):
    """Same architecture as ``tiny``, other weights (seed): a concept of one must be refused by the other."""
    from clic.builder import make_model

    return str(make_model("tiny", tmp_path_factory.mktemp("models") / "tiny-other", seed=123))


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """One UNet level, one text layer: for the tests that compile or trace the models (their cost grows with the
    number of layers)."""
    from clic.builder import make_model

    return str(make_model("micro", tmp_path_factory.mktemp("models") / "micro"))


@pytest.fixture
def micro_backbone(micro_model_dir):
    from clic.models import load_backbone

    return load_backbone(micro_model_dir, device="cpu")


@pytest.fixture(scope="session")
def micro_concept(micro_model_dir):
    """A concept learned for 2 steps on the micro model."""
    from clic.config import learn_config
    from clic.learn import learn
    from clic.models import load_backbone

    return learn(load_backbone(micro_model_dir, device="cpu"), [random_image()], [square_mask()],
                 learn_config(steps=2, object_class="chair"), progress=False).concept


_LOADED = {}


def shared_backbone(model_dir):
    """One loaded model per folder for the session: every job leaves a model as it found it (test_model_state.py),
    so the tests need not load it again."""
    from clic.models import load_backbone

    if model_dir not in _LOADED:
        _LOADED[model_dir] = load_backbone(model_dir, device="cpu")
    return _LOADED[model_dir]


@pytest.fixture
def backbone(tiny_model_dir):
    """The tiny model, as loaded: what a test installs on it by hand (processors, tokens, flags) goes afterwards."""
    from clic.concept import restored_model

    model = shared_backbone(tiny_model_dir)
    with restored_model(model):
        yield model


@pytest.fixture
def sdxl_backbone(tiny_sdxl_model_dir):
    """The tiny SDXL model, as loaded (what a test installs on it goes afterwards)."""
    from clic.concept import restored_model

    model = shared_backbone(tiny_sdxl_model_dir)
    with restored_model(model):
        yield model


@pytest.fixture(scope="session")
def concept_path(tiny_model_dir, tmp_path_factory):
    """A concept learned for 3 steps on the tiny model (shared by the transfer and generation tests)."""
    from clic.config import learn_config as make_config
    from clic.learn import learn
    from clic.models import load_backbone

    backbone = load_backbone(tiny_model_dir, device="cpu")
    path = tmp_path_factory.mktemp("concept") / "chair.safetensors"
    learn(backbone, [random_image()], [square_mask()], make_config(steps=3, object_class="chair"), out_path=path,
          progress=False)
    return path


@pytest.fixture
def concept(concept_path):
    from clic.concept import Concept

    return Concept.load(concept_path)


def square_mask(size=64, box=(8, 24, 40, 56)):
    """(1, size, size) mask with ones in rows box[0]:box[1], cols box[2]:box[3]."""
    m = torch.zeros(1, size, size)
    m[:, box[0]:box[1], box[2]:box[3]] = 1
    return m


def random_image(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g) * 2 - 1


@pytest.fixture
def example_paths():
    root = os.path.join(os.path.dirname(__file__), "..", "src", "clic", "assets", "examples")
    return os.path.join(root, "chair.png"), os.path.join(root, "chair_mask.png")


def on_meta(backbone):
    """``backbone`` with its models on the meta device, where tensors have shapes but no values: code that runs
    there never needs a value of the device (on a GPU: never waits for it)."""
    import dataclasses

    for model in (backbone.unet, backbone.vae, backbone.text_encoder):
        model.to("meta")
    return dataclasses.replace(backbone, device=torch.device("meta"))


class DeviceReads(TorchDispatchMode):
    """For models on the meta device, where no value exists: a copy to the host comes back as zeros and is counted
    (``reads``), as is a copy from the host (``writes``). Any other use of a device value on the host fails
    (``.item()``, ``nonzero`` and the like have no meta kernel)."""

    def __init__(self):
        super().__init__()
        self.reads = self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
            src, dst = args[0].device.type, torch.device(kwargs["device"]).type
            if (src, dst) == ("meta", "cpu"):
                self.reads += 1
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            self.writes += (src, dst) == ("cpu", "meta")
        return func(*args, **kwargs)
