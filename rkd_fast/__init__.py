"""rkd_fast: robust knowledge distillation with fused feature-map and finite-difference Jacobian losses."""

from . import attacks
from .attacks import evaluate
from .model_file import load_model, save_model
from .jacobian import jacobian_penalty
from .ops import backends, fd_jacobian_loss, feature_distance
from .losses import RobustKDLoss
from . import train
from .train import train_model

__all__ = ["attacks", "evaluate", "load_model", "save_model", "backends", "fd_jacobian_loss", "feature_distance",
           "jacobian_penalty", "RobustKDLoss", "train", "train_model"]
__version__ = "0.1.0"
