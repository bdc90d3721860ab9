"""FLUX.1 (``FluxPipeline``): the second model family, beside SD3.

:mod:`~marble_pl.flux.architecture` ships FLUX.1-dev's published configs,
:mod:`~marble_pl.flux.components` loads a pipeline's parts and builds them at real shape with
random weights, :mod:`~marble_pl.flux.tiny` builds a tiny FLUX for CPU tests, and
:mod:`~marble_pl.flux.memory` computes the memory of a training step at real shape.
"""
