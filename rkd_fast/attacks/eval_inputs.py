"""What `rkd-fast eval` evaluates: a model (any rkd_fast.model_source: a model file or run directory, an
architecture with a plain state_dict, or a RobustBench model on disk) and the batches of a data set split, read as
the trainer reads them.

Every model comes back taking inputs in [0, 1] and returning logits, normalisation inside, in eval mode. Every
error says which file or option is at fault (ValueError, FileNotFoundError, ImportError), and is raised before any
attack runs."""

import torch

from ..model_file import _normalization as normalization  # {"mean", "std"} of a model's InputNormalization
from ..model_source import Normalized
from ..teachers import load_source


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
