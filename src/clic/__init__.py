"""CLiC: Concept Learning in Context (Safaee et al.), a reference implementation on diffusers.

The pieces, one module per idea of the paper:

- :mod:`clic.models`     load a Stable Diffusion checkpoint (hub id or folder), pick device/dtype
- :mod:`clic.builder`    build random-init pipelines offline (tiny, SD1.4-sized) and the CLIP tokenizer
- :mod:`clic.attention`  cross-attention processor: trainable K/V (Custom Diffusion) + token maps CA(v*, x_t)
- :mod:`clic.losses`     l_con (eq. 2-3), l_att (eq. 1), l_RoI (eq. 4), total (eq. 5)
- :mod:`clic.learn`      in-context concept learning (sec. 3.1)
- :mod:`clic.concept`    the concept file (safetensors) and diffusers export
- :mod:`clic.cli`        the ``clic`` command
"""

__version__ = "0.1.0"
