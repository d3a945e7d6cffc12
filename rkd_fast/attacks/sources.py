"""What `rkd-fast eval` evaluates: a model (any rkd_fast.model_source: a model file or run directory, an
architecture with a plain state_dict, or a RobustBench model on disk) and the batches of a data set split, read as
the trainer reads them.

Every model comes back taking inputs in [0, 1] and returning logits, normalisation inside, in eval mode. Every
error says which file or option is at fault (ValueError, FileNotFoundError, ImportError), and is raised before any
attack runs."""

import torch

from ..model_file import _normalization as normalization  # {"mean", "std"} of a model's InputNormalization
from ..model_source import Normalized, load_source


def with_normalization(model, mean, std):
    """``model`` behind an `InputNormalization` ((x − mean) / std per channel): a model that takes inputs in
    [0, 1], as the attacks expect. The wrapped model is ``result.model``, the normalisation ``result.normalize``."""
    return Normalized(model, mean, std)


def model_from_weights(arch, weights, *, info, num_classes=None, mean=None, std=None, width=None,
                       explicit_normalization=False):
    """The architecture source `arch` (rkd_fast.model_source: an rkd_fast name, torchvision:NAME or timm:NAME)
    built for data set `info` with the state_dict in file `weights` (.pt, .pth or .safetensors), normalisation
    inside: `mean`/`std`, else the data set's. An rkd_fast state_dict holding its own normalisation buffers keeps
    them, unless ``explicit_normalization`` and they differ from mean/std, which is an error."""
    model, _ = load_source(arch, info, weights=weights, num_classes=num_classes, width=width, mean=mean, std=std)
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
