"""Trained models from any source, for distillation (the teacher) and evaluation: `load_source` (any source
of rkd_fast.model_source, with its weights), `load_any` (a model file, a training checkpoint or a run directory)
and `load_teacher`. It sits above the model-file format and the training checkpoints, which it reads both.

Specs:
- a path to a model file written by `rkd_fast.model_file.save_model` (`rkd-fast export`; .pt or .safetensors), a
  training checkpoint (best.pt) or a run directory;
- an architecture (``resnet18``, ``torchvision:resnet50``, ``timm:NAME``) with its weights (``weights``: a
  .pt/.pth/.safetensors state_dict), built for the data set (``info``);
- ``robustbench:DATASET/THREAT/NAME``, e.g. ``robustbench:cifar10/Linf/Addepalli2022Efficient_RN18``: loaded
  with RobustBench's ``load_model`` from ``teacher_dir/DATASET/THREAT/NAME.pt`` (RobustBench's own layout).
  The checkpoint must already be there: this never downloads (the training machines are offline).

Teachers come back in eval mode with ``requires_grad`` off (they are never trained; input gradients still flow
through them), and with "spec", "source" and "num_classes" in their `rkd_fast.models.model_info`.
"""

from pathlib import Path

from torch import nn

from .model_file import _normalization, describe_names, load_model, nonfinite_tensors
from .model_source import (SourceError, arch_kwargs, build_architecture, load_weights, load_weights_only,
                           source_kind)
from .models import model_info
from .train import checkpoints

ROBUSTBENCH_PREFIX = "robustbench:"
ROBUSTBENCH_PIP = "pip install git+https://github.com/RobustBench/robustbench"
ROBUSTBENCH_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
DEFAULT_TEACHER_DIR = "models"  # RobustBench's default model_dir


def parse_robustbench_spec(spec):
    """``robustbench:DATASET/THREAT/NAME`` -> (dataset, threat, name)."""
    parts = spec[len(ROBUSTBENCH_PREFIX):].split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"bad RobustBench spec {spec!r}: expected robustbench:DATASET/THREAT/NAME, e.g. "
                         f"robustbench:cifar10/Linf/Addepalli2022Efficient_RN18")
    dataset, threat, name = parts
    if dataset not in ROBUSTBENCH_CLASSES:
        raise ValueError(f"bad RobustBench spec {spec!r}: RobustBench dataset must be one of "
                         f"{', '.join(ROBUSTBENCH_CLASSES)}, got {dataset!r}")
    return dataset, threat, name


def _check_classes(spec, found, num_classes):
    if num_classes is not None and found != num_classes:
        raise ValueError(f"{spec} has {found} classes, but {num_classes} were asked (the data set's)")


def load_robustbench(spec, model_dir=None, num_classes=None):
    """(model, number of classes) of the RobustBench spec ``robustbench:DATASET/THREAT/NAME``, read from
    ``model_dir/DATASET/THREAT/NAME.pt`` (default ``./models``) by RobustBench's own ``load_model``; never
    downloads. ImportError without RobustBench, FileNotFoundError naming the expected file, ValueError for a bad
    spec or (num_classes given) another class count."""
    dataset, threat, name = parse_robustbench_spec(spec)
    _check_classes(spec, ROBUSTBENCH_CLASSES[dataset], num_classes)
    try:
        from robustbench.utils import load_model as rb_load_model
    except ImportError as e:
        raise ImportError(f"{spec} needs RobustBench, which could not be imported ({e}); install it with "
                          f"`{ROBUSTBENCH_PIP}`") from e
    model_dir = Path(DEFAULT_TEACHER_DIR if model_dir is None else model_dir)
    path = model_dir / dataset / threat / f"{name}.pt"
    if not path.is_file():
        # RobustBench would try to download it; this machine cannot, so say where the file must go.
        raise FileNotFoundError(f"{spec}: checkpoint {path} not found, and this machine cannot download "
                                f"it. Fetch it where there is network (robustbench.utils.load_model("
                                f"model_name={name!r}, dataset={dataset!r}, threat_model={threat!r}, "
                                f"model_dir=...)) and copy the .pt file to {path}, or pass the model "
                                f"directory that holds {dataset}/{threat}/{name}.pt")
    model = rb_load_model(model_name=name, dataset=dataset, threat_model=threat, model_dir=str(model_dir))
    if not isinstance(model, nn.Module):
        raise TypeError(f"robustbench load_model returned {type(model).__name__}, not a torch.nn.Module")
    return model, ROBUSTBENCH_CLASSES[dataset]


def _load_file(spec, num_classes, device, arch, in_channels):
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"teacher model file {path} does not exist (expected an rkd_fast model file, "
                                f"`rkd-fast export` output, a run directory, an architecture with its weights, or "
                                f"robustbench:DATASET/THREAT/NAME)")
    model = load_any(path, device)
    info = model_info(model)
    if arch is not None and info["arch"] != arch:
        raise ValueError(f"teacher {path} is a {info['arch']!r}, but {arch!r} was asked")
    _check_classes(spec, info["num_classes"], num_classes)
    norm = info.get("normalization")
    if in_channels is not None and norm is not None and len(norm["mean"]) != in_channels:
        raise ValueError(f"teacher {path} takes {len(norm['mean'])}-channel inputs, but {in_channels} were asked "
                         "(the data set's)")
    return model, info["num_classes"]


def load_teacher(spec, *, teacher_dir=None, num_classes=None, device=None, arch=None, in_channels=None,
                 weights=None, info=None):
    """The teacher named by `spec` (see the module docstring), on `device`, frozen and in eval mode.

    teacher_dir: where RobustBench checkpoints live (default ``./models``, RobustBench's). num_classes: when
    given, a teacher with another class count is a ValueError. arch, in_channels: for model files, the architecture
    the file must hold and the input channels it must take. weights, info: for an architecture, its state_dict
    file and the data set (a `rkd_fast.datasets.DatasetInfo`) it is built for."""
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"teacher spec must be a str or path, got {type(spec).__name__}")
    spec = str(spec)
    kind = source_kind(spec)
    if weights is not None and kind != "arch":
        raise ValueError(f"teacher {spec} holds its weights: --teacher-weights applies to an architecture "
                         "(resnet18, torchvision:NAME, timm:NAME)")
    if kind == "robustbench":
        model, classes = load_robustbench(spec, teacher_dir, num_classes)
    elif kind == "file":
        model, classes = _load_file(spec, num_classes, device, arch, in_channels)
    else:
        if info is None:
            raise ValueError(f"teacher {spec} is an architecture: it is built for a data set (info=...)")
        if weights is None:
            raise ValueError(f"teacher {spec} is an architecture: give its trained weights (--teacher-weights "
                             "FILE, a .pt/.pth/.safetensors state_dict)")
        model, _ = load_source(spec, info, weights=weights, num_classes=num_classes)
        classes = num_classes or info.num_classes
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    model.rkd_info = {**model_info(model), "spec": spec, "source": kind, "num_classes": classes}
    return model


def load_any(source, device=None):
    """The model of `source`, in eval mode: an rkd_fast model file (.pt or .safetensors), a training checkpoint
    (its student, rebuilt from the architecture and arguments it records) or a run directory (its best.pt)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise ValueError(f"{path} is a directory without best.pt: not a run directory whose robust validation "
                             "has run")
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix != ".safetensors":
        payload = load_weights_only(path)  # "not an rkd_fast model file" when it does not load
        if isinstance(payload, dict) and payload.get("format") == checkpoints.FORMAT:
            return checkpoint_student(checkpoints.read_checkpoint(path), path, device)
    return load_model(path, device)


def checkpoint_student(state, path, device=None):
    """The student of a training checkpoint's contents `state`, in eval mode, with the file's description (its
    method, data set, eps, epoch and validation accuracies) as its meta."""
    bad = nonfinite_tensors(state["student"])
    if bad:
        raise ValueError(f"{path}: the student has non-finite weights (NaN or Inf) in {describe_names(bad)}: "
                         "a diverged run; use an earlier checkpoint")
    model = build_architecture(state["model"]["arch"], **state["model"]["kwargs"])
    model.load_state_dict(state["student"])
    evaluated = [row for row in state["history"] if row.get("val_robust_acc") is not None]
    config = state["config"]
    model.rkd_info.update(num_classes=state["model"]["num_classes"], normalization=_normalization(model), meta={
        "method": config["method"], "dataset": state["dataset"], "eps": state["eps"],
        "epoch": state["position"]["epoch"], "global_step": state["position"]["global_step"],
        "val_clean_acc": evaluated[-1]["val_clean_acc"] if evaluated else None,
        "val_robust_acc": evaluated[-1]["val_robust_acc"] if evaluated else None,
        "source_checkpoint": str(path), "train_config": config})
    if device is not None:
        model.to(device)
    return model.eval()


def load_source(spec, info, *, weights=None, model_dir=None, num_classes=None, mean=None, std=None, width=None,
                need_weights=True):
    """(model, description) of any source `spec` for data set `info`, in eval mode on the CPU. An architecture
    takes `weights` (required when `need_weights`); a trained model (robustbench:, a file) holds its own."""
    kind = source_kind(spec)
    if kind != "arch" and weights is not None:
        raise SourceError(f"{spec} holds its weights; separate weights apply to an architecture")
    if kind != "robustbench" and model_dir is not None:
        raise SourceError("--model-dir applies to robustbench:DATASET/THREAT/NAME")
    if kind == "robustbench":
        try:
            model, classes = load_robustbench(spec, model_dir, num_classes or info.num_classes)
        except (FileNotFoundError, ImportError) as error:
            raise SourceError(str(error)) from error
        model.rkd_info = {**model_info(model), "num_classes": classes}
        return model.eval(), {"source": "robustbench", "spec": spec, "model_dir": str(model_dir or "models")}
    if kind == "file":
        model = load_any(spec)
        return model, {"source": "file", "path": str(spec), **model_info(model)}
    kwargs = arch_kwargs(spec, info, width=width, mean=mean, std=std, num_classes=num_classes)
    if weights is None and need_weights:
        raise SourceError(f"{spec} is an architecture: give its weights (a .pt, .pth or .safetensors state_dict)")
    model = build_architecture(spec, **kwargs)
    if weights is not None:
        load_weights(model, weights, spec)
    return model.eval(), {"source": "weights", "arch": spec, "weights": None if weights is None else str(weights),
                          "kwargs": kwargs}
