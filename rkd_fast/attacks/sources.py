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

EVAL_SPLITS = {"digits": "test", "cifar10": "test", "cifar100": "test", "imagenet": "val"}  # the default split


class _Chunks:
    """The batches of a `rkd_fast.datasets.ValSet` as (x, y), with a length."""

    def __init__(self, val_set, batch_size):
        self.val_set, self.batch_size = val_set, batch_size

    def __len__(self):
        return -(-len(self.val_set) // self.batch_size)

    def __iter__(self):
        for _, x, y in self.val_set.chunks(self.batch_size):
            yield x, y


def _subset(y, n_examples, where):
    """Indices of the fixed class-stratified subset of `n_examples` samples (the trainer's stratified_split), or
    None for all of them."""
    from ..datasets import stratified_split

    if n_examples is None or n_examples == len(y):
        return None
    if n_examples > len(y):
        raise ValueError(f"--n-examples {n_examples}: {where} holds only {len(y)} samples")
    return stratified_split(torch.as_tensor(y), n_examples)[1]


def eval_batches(dataset, split=None, *, data_dir=None, n_examples=None, batch_size=256, device=None,
                 image_size=None, num_workers=0):
    """``(batches, num_samples, num_classes)`` of a data set split, through the trainer's loaders: digits, cifar10,
    cifar100 as a `rkd_fast.datasets.GPULoader` (unshuffled, unaugmented, on `device`); imagenet (an ImageFolder
    tree ``data_dir/{train,val}/<class>/``) as the trainer's validation does it (resize, center crop to
    ``image_size``, default 224; `num_workers` DataLoader workers). ``n_examples``: a fixed class-stratified subset
    (`rkd_fast.datasets.stratified_split`, seed 0); None: the whole split."""
    from .. import datasets

    info = datasets.dataset_info(dataset)
    split = EVAL_SPLITS.get(dataset) if split is None else split
    if dataset not in EVAL_SPLITS:
        raise ValueError(f"rkd-fast eval reads {', '.join(EVAL_SPLITS)}, not {dataset!r}")
    if split not in info.splits:
        raise ValueError(f"--split {split!r}: {dataset} has the splits {', '.join(info.splits)}")
    if image_size is not None and dataset != "imagenet":
        raise ValueError(f"--image-size applies to imagenet, not {dataset}")
    where = f"{dataset} {split}"
    if dataset == "imagenet":
        datasets.require_data_dir(dataset, data_dir)
        try:
            folder = datasets.image_folder(data_dir, split, datasets.imagenet_transform("val", image_size or 224))
        except ImportError as error:
            raise ImportError("imagenet is read with torchvision, which is not installed: pip install torchvision") \
                from error
        index = _subset(folder.targets, n_examples, where)
        val_set = datasets.ValSet(folder, index, num_workers=num_workers,
                                  pin_memory=torch.device(device or "cpu").type == "cuda")
        return _Chunks(val_set, batch_size), len(val_set), len(folder.classes)
    if dataset == "digits":
        x, y = datasets.load_digits(split)
    else:
        datasets.require_data_dir(dataset, data_dir)
        x, y = datasets.load_cifar(data_dir, dataset, split)
    index = _subset(y, n_examples, where)
    if index is not None:
        x, y = x[index], y[index]
    loader = datasets.GPULoader(x, y, batch_size, augment=False, shuffle=False, drop_last=False, device=device,
                                channels_last=False, rank=0, world_size=1)
    return loader, len(y), info.num_classes
