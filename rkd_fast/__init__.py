"""rkd_fast: robust knowledge distillation with fused feature-map and finite-difference Jacobian losses."""

from .ops import backends, feature_distance

__all__ = ["backends", "feature_distance"]
__version__ = "0.1.0"
