"""rkd_fast: robust knowledge distillation with fused feature-map and finite-difference Jacobian losses."""

from .ops import backends, fd_jacobian_loss, feature_distance

__all__ = ["backends", "fd_jacobian_loss", "feature_distance"]
__version__ = "0.1.0"
