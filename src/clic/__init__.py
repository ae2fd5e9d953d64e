"""CLiC: Concept Learning in Context (Safaee et al.), a reference implementation on diffusers.

The method, one module per idea of the paper (the data path: image -> concept -> edited image):

- :mod:`clic.models`     load a Stable Diffusion checkpoint (hub id or folder), pick device/dtype
- :mod:`clic.builder`    build random-init pipelines offline (tiny, SD1.4-sized) and the CLIP tokenizer
- :mod:`clic.config`     the options of every job and the named recipes that preset them
- :mod:`clic.imaging`    image and mask I/O, overlays, grids
- :mod:`clic.tokens`     placeholder tokens v* and their trainable embedding rows
- :mod:`clic.attention`  cross-attention processor: trainable K/V (Custom Diffusion) + token maps CA(v*, x_t)
- :mod:`clic.losses`     l_con (eq. 2-3), l_att (eq. 1), l_RoI (eq. 4), total (eq. 5)
- :mod:`clic.learn`      in-context concept learning (sec. 3.1); :mod:`clic.runs` its checkpoints and logs
- :mod:`clic.concept`    the concept file (safetensors), applying it to a model
- :mod:`clic.stock`      a concept in a stock diffusers pipeline (``load_concept``), the export folder
- :mod:`clic.transfer`   concept transfer (sec. 3.2); :mod:`clic.sampling` the pieces of the denoising loops
- :mod:`clic.generate`   two-stage generation (sec. 4.1)
- :mod:`clic.roi`        RoI matching: automatic target and source masks (sec. 3.3)
- :mod:`clic.baselines`  Custom Diffusion, Break-A-Scene, RealFill (sec. 4.2)
- :mod:`clic.pipeline`   ``ClicPipeline``: learn, transfer and generate as a diffusers pipeline

``from clic import ClicPipeline, load_concept`` imports those two on first use (``import clic`` stays light).

Around it, never imported by it: the ``clic`` command (:mod:`clic.cli`), the web page (:mod:`clic.ui`) and the
research tools (:mod:`clic_lab`: speed bench, comparison runner, toy world, demo).
"""

__version__ = "0.1.0"

#: the public names of the package's top level -> their module (imported on first use)
_LAZY = {"ClicPipeline": "clic.pipeline", "ClicPipelineOutput": "clic.pipeline", "load_concept": "clic.stock",
         "unload_concept": "clic.stock", "export_diffusers": "clic.stock"}


def __getattr__(name):
    if name in _LAZY:
        import importlib  # the module imports torch and diffusers: only when one of these names is asked for

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clic' has no attribute {name!r}")
