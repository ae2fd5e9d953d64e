"""ClicPipeline: diffusers' conventions (from_pretrained, from_pipe, argument names, output types) over the same
computations as the library (same images as clic.transfer / clic.generate and a stock pipeline), and the
components left as they were."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import random_image, square_mask

from clic import ClicPipeline, load_concept
from clic.concept import Concept
from clic.errors import InputError, ModelError
from clic.generate import GenerateConfig, generate
from clic.imaging import image_size, load_image, load_mask
from clic.models import Backbone, load_backbone
from clic.transfer import TransferConfig, transfer

STEPS = 5


@pytest.fixture
def pipe(tiny_model_dir, concept_path):
    pipe = ClicPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_concept(concept_path)
    return pipe


def test_loading_follows_diffusers(tiny_model_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = ClicPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample is False   # the paper's
    assert pipe.name_or_path == tiny_model_dir and pipe.device.type == "cpu" and pipe.resolution == 64
    # SDXL's second text encoder and tokenizer are optional components, None for an SD1.x/SD2.x model
    assert sorted(k for k, v in pipe.components.items() if v is not None) == ["scheduler", "text_encoder",
                                                                             "tokenizer", "unet", "vae"]
    assert pipe.text_encoder_2 is None and pipe.tokenizer_2 is None and type(pipe.backbone) is Backbone

    sd = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    shared = ClicPipeline.from_pipe(sd)                     # an existing pipeline's components, not copies
    assert shared.unet is sd.unet and shared.text_encoder is sd.text_encoder
    assert load_backbone(sd).unet is sd.unet                # the library's loader takes a pipeline too

    with pytest.raises(ModelError, match="not a diffusers model folder"):
        ClicPipeline.from_pretrained(tiny_model_dir + "/unet")


def test_transfer_is_clic_transfer(pipe, concept, example_paths):
    image, mask = example_paths
    out = pipe(image=image, mask_image=mask, num_inference_steps=STEPS, t_start=1, eta=2.0, output_type="pt",
               full_size=False, generator=torch.Generator().manual_seed(4))
    backbone = load_backbone(pipe.name_or_path, device="cpu")
    cfg = TransferConfig(steps=STEPS, t_start=1, eta=2.0, seeds=(4,))
    ours = transfer(backbone, concept, load_image(image, 64), load_mask(mask, 64, image_size(image)), cfg,
                    progress=False)
    torch.testing.assert_close(out.images, (ours.images + 1) / 2, rtol=1e-5, atol=1e-5)
    assert out.seeds == [4] and out.prompt == "a chair with <v*> style" and out.attention.shape == (1, 1, 16, 16)
    assert out.attention_overlays()[0].size == (64, 64)

    # at the target's own size by default (the chair example is 256 px): PIL images
    full = pipe(image=image, mask_image=mask, num_inference_steps=STEPS, t_start=1, eta=2.0)
    assert isinstance(full.images[0], PIL.Image.Image) and full.images[0].size == (256, 256)


def test_full_size_results_are_pasted_back_with_the_distance_feather(pipe, example_paths, monkeypatch):
    """At the target's own size the results are clic.transfer.paste_back's, whose feather of a binary mask is one
    chessboard distance transform (not a dilation per pixel of radius): the pipeline, hence the commands and the
    page, take that path."""
    import torch.nn.functional as F

    import clic.transfer
    from clic.imaging import load_full_size

    calls, real = [], clic.transfer.chessboard_distance

    def spy(inside, cap):
        calls.append((tuple(inside.shape), cap))
        return real(inside, cap)

    monkeypatch.setattr(clic.transfer, "chessboard_distance", spy)
    image, mask = example_paths
    out = pipe(image=image, mask_image=mask, num_inference_steps=STEPS, t_start=1, output_type="pt",
               generator=torch.Generator().manual_seed(2))
    # the composite at the model's 64 px (feather 64 // 64 = 1 pixel), then at the 256 px target's (256 / 64 = 4)
    assert calls == [((64, 64), 1), ((256, 256), 4)]
    original, original_mask = load_full_size(image, mask, 0.5)
    expected = clic.transfer.paste_back(out.result.decoded, original, original_mask, 4)
    torch.testing.assert_close(out.images, ((expected + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)
    far = F.max_pool2d(original_mask[None], 9, stride=1, padding=4)[0, 0] == 0    # over 4 pixels from the mask
    assert far.any() and torch.equal(expected[0][:, far], original[:, far])      # the target's pixels, exactly


def test_generate_is_a_stock_pipeline_with_the_concept(pipe, concept, tiny_model_dir):
    """base_steps=0 (plain sampling with the concept) and DDIM without clipping: a stock StableDiffusionPipeline with
    the concept loaded gives the same image."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = pipe.generate(num_inference_steps=STEPS, base_steps=0, generator=torch.Generator().manual_seed(7),
                        output_type="pt")
    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config, clip_sample=False)
    stock.set_progress_bar_config(disable=True)
    load_concept(stock, concept)
    theirs = stock(out.prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
                   output_type="pt").images
    torch.testing.assert_close(out.images, theirs, rtol=1e-4, atol=1e-4)

    # and the paper's two-stage default is clic.generate's
    two = pipe.generate(num_inference_steps=STEPS, num_images_per_prompt=2, output_type="latent")
    ours = generate(load_backbone(tiny_model_dir, device="cpu"), concept, GenerateConfig(steps=STEPS, num=2),
                    progress=False)
    assert two.seeds == [0, 1]
    torch.testing.assert_close(two.images, ours.latents, rtol=1e-5, atol=1e-5)


def test_arguments_and_outputs(pipe):
    out = pipe(num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (3, 9)], output_type="np")
    assert out.seeds == [3, 9] and out.images.shape == (2, 64, 64, 3) and out.images.dtype == np.float32
    assert 0 <= out.images.min() and out.images.max() <= 1
    # images and masks in memory, as diffusers takes them: PIL, numpy, tensors in [0, 1]
    image = ((random_image(seed=2) + 1) / 2)
    for target, mask in ((image, square_mask()[0].numpy() > 0),
                         (PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)),
                          PIL.Image.fromarray(square_mask()[0].numpy().astype(np.uint8) * 255))):
        out = pipe.transfer(target, mask, num_inference_steps=2, eta=0.0)
        assert out.images[0].size == (64, 64)
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        pipe.transfer(image * 2 - 1, square_mask(), num_inference_steps=2)
    with pytest.raises(InputError, match="output_type"):
        pipe.generate(num_inference_steps=1, output_type="latents")
    with pytest.raises(InputError, match="both image and mask_image"):
        pipe(image=image)
    pipe.unload_concept()
    with pytest.raises(InputError, match="no concept loaded"):
        pipe.generate(num_inference_steps=1)


def test_learn_twice_and_the_components_stay_as_they_were(tiny_model_dir, example_paths):
    pipe = ClicPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    processors = dict(pipe.unet.attn_processors)
    vocab = len(pipe.tokenizer)
    image, mask = example_paths
    first = pipe.learn(image, mask, object_class="chair", steps=2, lr=1e-3).concept
    second = pipe.learn(image, mask, object_class="chair", steps=2, lr=1e-3).concept   # same <v*>: no clash
    assert first.tokens == second.tokens == ["<v*>"] and pipe.concept is second
    pipe(image=image, mask_image=mask, num_inference_steps=2)
    pipe.generate(num_inference_steps=2)
    assert len(pipe.tokenizer) == vocab
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_concept_of_another_model_is_refused(other_tiny_model_dir, concept_path):
    pipe = ClicPipeline.from_pretrained(other_tiny_model_dir)
    with pytest.raises(Exception, match="made for base model"):
        pipe.load_concept(Concept.load(concept_path))
