"""Multiscale decompositions: any object with ``decompose``, ``recompose``, ``preview`` and ``stage_shapes``."""

from .laplacian import LaplacianDecomposition

__all__ = ["LaplacianDecomposition"]
