"""Training: ``rkd_fast.train_model(method=..., teacher=..., epochs=...)`` (re-exported at the top level) is the
function behind `rkd-fast train`; it returns a TrainResult."""

from .config import TrainConfig, make_config
from .trainer import TrainResult, train_model

__all__ = ["TrainConfig", "TrainResult", "make_config", "train_model"]
