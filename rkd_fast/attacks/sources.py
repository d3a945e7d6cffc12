"""What `rkd-fast eval` evaluates: a model (a model file, an architecture with a plain state_dict, or a RobustBench
model on disk) and the batches of a data set split, read as the trainer reads them.

Every model comes back taking inputs in [0, 1] and returning logits, normalisation inside, in eval mode. Every
error says which file or option is at fault (ValueError, FileNotFoundError, ImportError), and is raised before any
attack runs."""

import inspect
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..model_file import FORMAT, load_weights_only
from ..model_file import _normalization as normalization  # {"mean", "std"} of a model's InputNormalization
from ..models import MODELS, InputNormalization, build_model

TORCHVISION_PREFIX = "torchvision:"


def with_normalization(model, mean, std):
    """``model`` behind an `InputNormalization` ((x − mean) / std per channel): a model that takes inputs in
    [0, 1], as the attacks expect. The wrapped model is ``result.model``, the normalisation ``result.normalize``."""
    return nn.Sequential(OrderedDict(normalize=InputNormalization(list(mean), list(std)), model=model))


def read_state_dict(path):
    """The plain state_dict in file `path` (torch.load with weights_only=True: {name: tensor}, also accepted
    under a "state_dict" key, a DataParallel "module." prefix removed). ValueError naming the file otherwise."""
    path = Path(path)
    payload = load_weights_only(path, "a state_dict file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        raise ValueError(f"{path} is an rkd_fast model file, not a plain state_dict: pass it as --checkpoint")
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise ValueError(f"{path} is not a plain state_dict (a dict of parameter names to tensors)")
    if all(key.startswith("module.") for key in payload):
        payload = {key[len("module."):]: value for key, value in payload.items()}
    return payload


def _load_weights(model, state, path, arch):
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit {arch}: {' '.join(str(error).split())}") from error


def model_from_weights(arch, weights, *, num_classes, in_channels, mean, std, width=None, stem=None,
                       explicit_normalization=False):
    """The architecture `arch` with the plain state_dict in file `weights`, normalisation inside.

    ``arch``: a name of `rkd_fast.models.MODELS` (built with num_classes, in_channels, mean, std and, when given
    and the architecture takes them, width and stem; a state_dict holding its own normalisation buffers keeps
    them, unless ``explicit_normalization`` and they differ from mean/std, which is an error), or
    ``torchvision:NAME`` (``torchvision.models.get_model(NAME, num_classes=...)`` behind `with_normalization`)."""
    state = read_state_dict(weights)
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch[len(TORCHVISION_PREFIX):]
        try:
            import torchvision
        except ImportError as error:
            raise ImportError(f"--arch {arch} needs torchvision: pip install torchvision") from error
        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision architecture {name!r} (see torchvision.models.list_models())")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        _load_weights(model, state, weights, arch)
        return with_normalization(model, mean, std)
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(sorted(MODELS))} or "
                         f"torchvision:NAME")
    params = inspect.signature(MODELS[arch]).parameters
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "mean": list(mean), "std": list(std)}
    for name, value in (("width", width), ("stem", stem)):
        if value is not None and name in params:
            kwargs[name] = value
        elif value is not None and name == "width":
            raise ValueError(f"--width: architecture {arch!r} has no width argument")
    model = build_model(arch, **kwargs)
    _load_weights(model, state, weights, arch)
    found = normalization(model)
    if explicit_normalization and found is not None and not torch.allclose(
            torch.tensor(found["mean"] + found["std"]), torch.tensor([*map(float, mean), *map(float, std)])):
        held = {key: [round(v, 4) for v in values] for key, values in found.items()}
        raise ValueError(f"{weights} holds the normalisation mean={held['mean']}, std={held['std']}, but --mean/"
                         f"--std ask mean={list(mean)}, std={list(std)}: drop --mean/--std to use the file's")
    return model


# --- data ------------------------------------------------------------------------------------------------------
# Read as the trainer reads it, by the data set's own declaration (rkd_fast.datasets.eval_data).

def _eval_splits():
    from ..datasets import eval_splits

    return eval_splits()


EVAL_SPLITS = _eval_splits()  # data set -> the split eval reads by default


def eval_batches(dataset, split=None, *, data_dir=None, n_examples=None, batch_size=256, device=None,
                 image_size=None, num_workers=0):
    """``(batches, num_samples, num_classes)`` of a data set split: rkd_fast.datasets.eval_data."""
    from ..datasets import eval_data

    return eval_data(dataset, split, data_dir=data_dir, n_examples=n_examples, batch_size=batch_size,
                     device=device, image_size=image_size, num_workers=num_workers)
