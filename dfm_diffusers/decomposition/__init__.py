"""Multiscale decompositions: any object with ``decompose``, ``recompose``, ``preview`` and ``stage_shapes``."""

from .laplacian import LaplacianDecomposition, box_downsample

__all__ = ["LaplacianDecomposition", "box_downsample"]
