"""Training. This package is callable: ``rkd_fast.train(method=..., teacher=..., epochs=...)`` is
``rkd_fast.train.train_model(...)``, the function behind `rkd-fast train`; it returns a TrainResult."""

import sys
import types

from .config import TrainConfig, make_config
from .trainer import TrainResult, train_model

__all__ = ["TrainConfig", "TrainResult", "make_config", "train_model"]


class _CallableModule(types.ModuleType):
    # Lets `rkd_fast.train(...)` be the training function while `rkd_fast.train.cli` etc. stay submodules.
    def __call__(self, config=None, **overrides):
        return train_model(config, **overrides)


sys.modules[__name__].__class__ = _CallableModule
