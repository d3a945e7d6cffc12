"""A data set by name, from its declaration (rkd_fast.datasets.spec.DatasetSpec): `open_split`, the one way a
split held as tensors is read (training, evaluation, the demo and the study), `build_dataset`, the loader of one
split, `run_data`, the data of a training run (`rkd-fast train`), and `eval_data`, the batches `rkd-fast eval`
attacks. Nothing here knows a data set by name."""

import torch

from .spec import dataset_spec
from .loaders import GPULoader, TensorValSet
from .splits import stratified_split


def require_data_dir(name, data_dir):
    """ValueError naming what the directory of data set `name` must hold, when it needs one and none was given."""
    spec = dataset_spec(name)
    if data_dir is None and spec.needs_data_dir:
        raise ValueError(f"{name} needs --data-dir DIR: the directory holding {spec.data_dir}")


def open_split(name, split, data_dir=None, *, download=False, verify=True):
    """``(x, y)`` of split `split` of data set `name` (one held as tensors), on the host: x ``(N, C, H, W)`` uint8
    (0..255) or float in [0, 1], y int64. Files missing: FileNotFoundError; files wrong: ValueError naming the
    file; both raised before anything is written."""
    spec = dataset_spec(name)
    if spec.read is None:
        raise ValueError(f"{name} is streamed from files, not read as tensors")
    if split not in spec.info.splits:
        raise ValueError(f"unknown {name} split {split!r}; expected one of {', '.join(spec.info.splits)}")
    if download and not spec.download:
        raise ValueError(f"--download does not apply to {name}")
    require_data_dir(name, data_dir)
    return spec.read(split, data_dir, download=download, verify=verify)


def build_dataset(name, data_dir=None, split="train", *, batch_size=128, device=None, seed=0, rank=None,
                  world_size=None, num_workers=8, loader="pytorch", download=False, verify=True, augment=None,
                  num_batches=100):
    """The loader of data set `name` (see `DATASETS`) for `split`, yielding ``(x, y)`` with x in [0, 1].

    A data set held as tensors (digits, fashion-mnist, cifar10, cifar100): a `GPULoader` on `device`, train
    shuffled and augmented when the data set is (`DatasetSpec.augment`; ``augment`` overrides). imagenet: an
    `ImageFolderLoader` (``loader="pytorch"``) or a `DALILoader` (``loader="dali"``) over
    ``data_dir/{train,val}``. synthetic-imagenet: a `SyntheticLoader` of `num_batches` batches. ``batch_size`` is
    per rank."""
    spec = dataset_spec(name)
    info = spec.info
    if split not in info.splits:
        raise ValueError(f"unknown {name} split {split!r}; expected one of {', '.join(info.splits)}")
    train = split == "train"
    require_data_dir(name, data_dir)
    shard = {"seed": seed, "rank": rank, "world_size": world_size, "device": device}
    if spec.read is None:
        return spec.loader(split, data_dir, batch_size=batch_size, num_workers=num_workers, loader=loader,
                           num_batches=num_batches, **shard)
    x, y = open_split(name, split, data_dir, download=download, verify=verify)
    augment = train and spec.augment if augment is None else augment
    # An augmented training split drops its last short batch (GPULoader's default); the others serve every sample.
    return GPULoader(x, y, batch_size, augment=augment, shuffle=train, drop_last=train and augment, **shard)


def run_data(cfg, device, ctx):
    """The data of a training run with config `cfg` (a rkd_fast.train.TrainConfig) on rank `ctx` (its ``rank`` and
    ``world_size``, a rkd_fast.train.distributed.Distributed) training on `device`: ``(info, train, val)``.

    info: the run's `DatasetInfo` (imagenet: as many classes as class folders; imagenet and synthetic-imagenet: the
    input size ``image_size``). train: this rank's training batches, ``(x, y)`` with x float in [0, 1], on the
    device (data sets held as tensors, synthetic) or on the host (imagenet: pinned memory when training on CUDA),
    in channels_last when ``cfg.channels_last`` (imagenet: as read); ``len`` (batches per epoch),
    ``set_epoch(epoch, start_batch)``, ``num_samples`` (an epoch's samples over all ranks). Batch k of rank r is
    the ``[r::world_size]`` share of global batch k of an epoch order that depends on (seed, epoch) alone, every
    sample once per epoch (the last global batch may be short), so a checkpoint resumes under any world size with
    the same global batch. val: the split the robust validation attacks, never augmented, a `TensorValSet` or
    `ValSet` (``len``, ``chunks(rank=, world_size=)``; its ``chunk_size`` the one the trainer validates with).

    Model selection uses a val split, never test: the data set's own "val" split, or (`DatasetSpec.val_from_train`:
    cifar10, cifar100, fashion-mnist) a fixed stratified ``val_size`` images held out of train, the rest being
    train; imagenet and synthetic-imagenet: see their modules. ``train_size``: train on a fixed stratified subset
    of the train images left. Stratified subsets: `stratified_split`, seed
    VAL_SPLIT_SEED, whatever the run's seed. Raises ValueError naming what was expected when the data cannot be
    read (before the run writes anything). Nothing is drawn from the global RNGs."""
    spec = dataset_spec(cfg.dataset)
    shard = {"seed": cfg.seed, "rank": ctx.rank, "world_size": ctx.world_size}
    require_data_dir(cfg.dataset, cfg.data_dir)
    if spec.read is None:
        return spec.run_data(cfg, device, spec.info, shard)
    try:
        x, y = open_split(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
        if spec.val_from_train is not None:
            train, val = stratified_split(y, cfg.val_size or spec.val_from_train)
            x, y, x_val, y_val = x[train], y[train], x[val], y[val]
        else:
            x_val, y_val = open_split(cfg.dataset, "val", cfg.data_dir)
    except FileNotFoundError as error:  # a bad --data-dir is bad input, like any other option
        raise ValueError(str(error)) from error
    if cfg.train_size is not None and cfg.train_size < len(y):  # a cheaper run: a fixed subset, classes balanced
        keep = stratified_split(y, cfg.train_size)[1]
        x, y = x[keep], y[keep]
    x_val, y_val = x_val.to(device), y_val.to(device)
    if x_val.dtype == torch.uint8:
        x_val = x_val.float().div_(255)
    # Pixels stay as read (uint8 for files) on the device; GPULoader scales each batch. drop_last=False: the step
    # count and the short last batch's weighting assume every sample is served.
    batches = GPULoader(x, y, cfg.batch_size, augment=spec.augment, shuffle=True, drop_last=False, device=device,
                        channels_last=cfg.channels_last, **shard)
    # The device holds the whole split: chunks of at least 256 samples.
    return spec.info, batches, TensorValSet(x_val, y_val, chunk_size=max(cfg.batch_size, 256))


def eval_splits():
    """Data set name -> the split `rkd-fast eval` reads unless --split (the data sets eval reads)."""
    from .spec import SPECS

    return {name: spec.eval_split for name, spec in SPECS.items() if spec.eval_split is not None}


def eval_data(name, split=None, *, data_dir=None, n_examples=None, batch_size=256, device=None, image_size=None,
              num_workers=0, download=False):
    """``(batches, num_samples, num_classes)`` of a data set split as `rkd-fast eval` attacks it, read as the
    trainer reads it: a data set held as tensors as a `GPULoader` (unshuffled, unaugmented, on `device`); a streamed
    one as its module says (imagenet: as the trainer's validation, resized and center cropped to ``image_size``,
    default 224, by `num_workers` DataLoader workers). ``n_examples``: a fixed class-stratified subset
    (`stratified_split`, seed 0); None: the whole split."""
    spec = dataset_spec(name)
    readable = eval_splits()
    if name not in readable:
        raise ValueError(f"rkd-fast eval reads {', '.join(readable)}, not {name!r}")
    split = readable[name] if split is None else split
    if split not in spec.info.splits:
        raise ValueError(f"--split {split!r}: {name} has the splits {', '.join(spec.info.splits)}")
    if image_size is not None and "image_size" not in spec.options:
        sized = [d for d in readable if "image_size" in dataset_spec(d).options]
        raise ValueError(f"--image-size applies to {'/'.join(sized)}, not {name}")
    where = f"{name} {split}"

    def subset(y):
        if n_examples is None or n_examples == len(y):
            return None
        if n_examples > len(y):
            raise ValueError(f"--n-examples {n_examples}: {where} holds only {len(y)} samples")
        return stratified_split(torch.as_tensor(y), n_examples)[1]

    if spec.read is None:
        require_data_dir(name, data_dir)
        return spec.eval_data(split, data_dir, n_examples, batch_size=batch_size, device=device,
                              image_size=image_size, num_workers=num_workers, subset=subset)
    x, y = open_split(name, split, data_dir, download=download)
    index = subset(y)
    if index is not None:
        x, y = x[index], y[index]
    loader = GPULoader(x, y, batch_size, augment=False, shuffle=False, drop_last=False, device=device,
                       channels_last=False, rank=0, world_size=1)
    return loader, len(y), spec.info.num_classes
