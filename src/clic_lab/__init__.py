"""Research tools around the clic method. Nothing in :mod:`clic` imports this package; it imports :mod:`clic` like any
user would.

- :mod:`clic_lab.bench`     speed and memory of learning, transfer and generation (``clic bench``, BENCHMARKS.md),
                            with the reference path (the official code's computation) to compare against
- :mod:`clic_lab.compare`   the comparison of methods and ablations on a manifest of cases (``clic benchmark``) and
                            its quality metrics (``clic evaluate``)
- :mod:`clic_lab.demo`      the offline demo (``clic demo``)
- :mod:`clic_lab.toyworld`  the procedural toy world, its pattern detector, the toy model and the quality benchmark
"""
