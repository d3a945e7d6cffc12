"""The model file format: what `rkd-fast eval` reads and `rkd-fast export` writes.

One `torch.save`d dict, readable with ``torch.load(weights_only=True)`` (plain containers, numbers, strings and
tensors only, so loading a file never runs code)::

    format         "rkd_fast.model"
    version        1
    arch           its architecture source (rkd_fast.model_source): an rkd_fast.models.MODELS name,
                   torchvision:NAME or timm:NAME
    kwargs         the constructor keyword arguments given to rkd_fast.model_source.build_architecture
    num_classes    number of logits
    normalization  {"mean": [...], "std": [...]} of the model's InputNormalization, or None
    state_dict     the weights, on CPU
    meta           free-form metadata given to save_model (same plain types)
    torch_version  the torch that wrote it

The same model as ``.safetensors`` (`save_model` to a path ending in .safetensors, ``rkd-fast export --format
safetensors``): the state_dict as the tensors, every other entry JSON-encoded in the file's string metadata.
"""

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_save, atomic_write
from .model_source import _read_safetensors, build_architecture, load_weights_only, parse_arch
from .models import MODELS, InputNormalization, model_info

FORMAT = "rkd_fast.model"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "arch", "kwargs", "num_classes", "normalization", "state_dict", "meta")


def _check_plain(name, value):
    """Raises TypeError unless `value` is made of what weights_only loading accepts."""
    # Exact types: subclasses (numpy scalars, torch's TorchVersion str) are not on weights_only's allow-list.
    if value is None or type(value) in (str, bool, int, float) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(f"{name}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{name} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(f"{name}[{key!r}]", item)
        return
    raise TypeError(f"{name} is a {type(value).__name__}, which a weights_only load cannot read; store plain "
                    f"numbers, strings, lists, dicts or tensors")


def _num_classes(arch, kwargs, model):
    params = inspect.signature(MODELS[arch]).parameters if arch in MODELS else {}
    if "num_classes" in kwargs:
        return int(kwargs["num_classes"])
    if "num_classes" in params and params["num_classes"].default is not inspect.Parameter.empty:
        return int(params["num_classes"].default)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the number of classes of {arch!r}: no num_classes argument and no Linear layer")
    return linears[-1].out_features


def _normalization(model):
    for module in model.modules():
        if isinstance(module, InputNormalization):
            return {"mean": module.mean.flatten().tolist(), "std": module.std.flatten().tolist()}
    return None


def save_model(model, path, **meta):
    """Writes `model` (built with `rkd_fast.models.build_model` or `rkd_fast.model_source.build_architecture`,
    which record its architecture and keyword arguments on it) to `path`, atomically: a temporary file in the
    same directory, fsync'd, then renamed over `path`; as safetensors when `path` ends in .safetensors.
    ``meta``: extra plain metadata stored beside the weights (epoch, method, eps...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    arch, kwargs = model_info(model).get("arch"), model_info(model).get("kwargs")
    if arch is None or kwargs is None:
        raise ValueError("save_model needs a model built with rkd_fast.models.build_model(arch, **kwargs) or "
                         "rkd_fast.model_source.build_architecture (they record the architecture and arguments "
                         "the file must hold)")
    parse_arch(arch)
    _check_plain("the model's constructor kwargs", kwargs)
    _check_plain("meta", meta)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "kwargs": dict(kwargs),
        "num_classes": _num_classes(arch, kwargs, model),
        "normalization": _normalization(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta),
        "torch_version": str(torch.__version__),
    }
    if Path(path).suffix == ".safetensors":
        return _save_safetensors(payload, path)
    return atomic_save(payload, path)


def _save_safetensors(payload, path):
    try:
        from safetensors.torch import save
    except ImportError as error:
        raise ValueError("writing .safetensors needs safetensors: pip install safetensors") from error
    # own contiguous copies: safetensors refuses views and tensors sharing memory (tied weights)
    tensors = {k: v.contiguous().clone() for k, v in payload["state_dict"].items()}
    metadata = {k: json.dumps(v) for k, v in payload.items() if k != "state_dict"}
    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def _read_safetensors_payload(path):
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != json.dumps(FORMAT):
        raise ValueError(f"{path} is not an rkd_fast model file (its metadata has no 'format': {FORMAT!r}); "
                         "plain weights? give them to an architecture (eval --arch NAME --weights FILE)")
    try:
        payload = {k: json.loads(v) for k, v in metadata.items()}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: damaged rkd_fast metadata ({error})") from error
    return {**payload, "state_dict": tensors}


def read_model_file(path):
    """The checked contents of a model file (the dict described above), loaded with weights_only=True."""
    path = Path(path)
    payload = _read_safetensors_payload(path) if path.suffix == ".safetensors" else load_weights_only(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rkd_fast model file (no 'format': {FORMAT!r} entry); a raw state_dict "
                         f"or a training checkpoint? `rkd-fast export` writes a model file from the latter")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path} is an incomplete rkd_fast model file: missing {', '.join(missing)}")
    if not isinstance(payload["version"], int) or payload["version"] > VERSION:
        raise ValueError(f"{path} has model file version {payload['version']!r}; this rkd_fast reads up to "
                         f"version {VERSION}: upgrade rkd_fast")
    try:
        parse_arch(payload["arch"])
    except ValueError as error:
        raise ValueError(f"{path} holds architecture {payload['arch']!r}, which is not registered or cannot be built here: {error}") \
            from error
    return payload


def load_model(path, device=None):
    """The model stored in `path` by `save_model`, on `device` (default CPU), in eval mode.

    The file's metadata joins the model's `rkd_fast.models.model_info`: meta, num_classes, normalization."""
    payload = read_model_file(path)
    check_weights(payload, path)
    model = build_architecture(payload["arch"], **payload["kwargs"])
    model.load_state_dict(payload["state_dict"])  # check_weights has matched every name and shape
    model.rkd_info.update(meta=payload["meta"], num_classes=payload["num_classes"],
                          normalization=payload["normalization"])
    if device is not None:
        model.to(device)
    return model.eval()


def check_weights(payload, path):
    """ValueError naming `path` unless the file's recorded architecture and arguments fit its weights, class count
    and normalisation, and every weight is finite. The model is built on the meta device to compare the shapes
    (no memory is allocated), so a file asking for an absurd width is refused before anything is built."""
    arch, kwargs, state = payload["arch"], payload["kwargs"], payload["state_dict"]
    if not isinstance(kwargs, dict) or not isinstance(state, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: 'kwargs' must be a dict and 'state_dict' a dict of tensors")
    try:
        with torch.device("meta"):
            expected = build_architecture(arch, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {arch}({kwargs}) cannot be built: {error}") from error
    shapes = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {shapes[k]})" for k in shapes
             if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        problems = [f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                    f"wrong shapes {', '.join(wrong[:3])}" if wrong else ""]
        raise ValueError(f"{path}: the weights do not fit {arch}({kwargs}): "
                         + "; ".join(p for p in problems if p))
    if payload["num_classes"] != _num_classes(arch, kwargs, expected):
        raise ValueError(f"{path}: records num_classes {payload['num_classes']}, but {arch}({kwargs}) has "
                         f"{_num_classes(arch, kwargs, expected)}")
    recorded = payload["normalization"]
    for key in ("mean", "std") if recorded is not None else ():
        buffer = state.get(f"normalize.{key}")  # every model here names its InputNormalization `normalize`
        if buffer is None or not torch.equal(buffer.flatten(), torch.tensor(recorded[key], dtype=buffer.dtype)):
            raise ValueError(f"{path}: its recorded input normalisation {key} {recorded[key]} disagrees with the "
                             f"model's normalize.{key} buffer")
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(f"{path}: non-finite weights (NaN or Inf) in {describe_names(bad)}: a diverged model")


def nonfinite_tensors(state_dict):
    """Names of the floating-point tensors of `state_dict` that hold a NaN or an Inf (one host sync for all)."""
    floating = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not floating:
        return []
    finite = torch.stack([torch.isfinite(v).all() for v in floating.values()]).cpu()
    return [k for k, ok in zip(floating, finite.tolist()) if not ok]


def describe_names(names, shown=3):
    """'3 tensors (a, b, c)' or '5 tensors (a, b, c, ...)'."""
    more = ", ..." if len(names) > shown else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({', '.join(names[:shown])}{more})"
