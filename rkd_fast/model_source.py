"""Model sources: one grammar for every model a command takes (`rkd-fast train --arch/--teacher`, `eval`,
`layers`, `export`), parsed and built here.

An *architecture* (built from its name, weights optional):
- an rkd_fast registry name (``small_cnn``, ``resnet18``, ...; `rkd_fast.models.MODELS`);
- ``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None, num_classes=...)``);
- ``timm:NAME`` (``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``; nothing is
  downloaded). Needs timm: ``pip install 'rkd_fast[timm]'``.
An architecture may carry constructor arguments after commas, e.g. ``timm:test_vit,patch_size=2``.

A *trained model* (weights included):
- ``robustbench:DATASET/THREAT/NAME``, read from ``--model-dir`` (rkd_fast.teachers);
- a file: an rkd_fast model file (``.pt`` or ``.safetensors``, `rkd_fast.model_file`), a training checkpoint
  (``best.pt``, ``checkpoints/ckpt-*.pt``) or a run directory (its ``best.pt``).

Weights for an architecture: a ``.pt``/``.pth`` state_dict (``torch.load(weights_only=True)``: no pickled code
runs) or a ``.safetensors`` file, holding the bare model's keys (as torchvision and timm publish them) or the
keys of the model built here.

Every model comes back taking inputs in [0, 1]: torchvision and timm models are wrapped in `Normalized`, which
applies the data set's (or the given) normalisation first, so attacks see pixels. Module names given by a user
(``--feature-pair``, `rkd-fast layers`) are those of the bare model: ``layer4``, not ``model.layer4``."""

import difflib
import inspect
import math
from pathlib import Path

import torch
from torch import nn

from .models import DEFAULT_FEATURE_LAYER, MODELS, InputNormalization, build_model, model_info

TORCHVISION = "torchvision:"
TIMM = "timm:"
ROBUSTBENCH = "robustbench:"
ARCH_PREFIXES = {TORCHVISION: "torchvision", TIMM: "timm"}
TIMM_INSTALL = "pip install 'rkd_fast[timm]' (or pip install timm)"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
SOURCES_HELP = ("an rkd_fast architecture (" + ", ".join(MODELS) + "), torchvision:NAME, timm:NAME (optionally "
                "with constructor arguments: timm:NAME,key=value), robustbench:DATASET/THREAT/NAME, or a model "
                "file / run directory")


class SourceError(ValueError):
    """A model source that cannot be used: always one line naming the source and what to do."""


class Normalized(nn.Module):
    """A model taking normalised inputs, behind its `InputNormalization`: takes [0, 1] inputs.

    ``channels``: the inputs the wrapped model takes; a one-channel (grey) input is repeated to fill them, as
    one feeds grey images to an RGB network."""

    def __init__(self, model, mean, std, channels=None):
        super().__init__()
        self.normalize = InputNormalization(list(mean), list(std))
        self.model = model
        self.channels = channels

    def forward(self, x):
        x = self.normalize(x)
        if self.channels is not None and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, *x.shape[2:])
        return self.model(x)


def bare(model):
    """The user's view of `model`: the wrapped model of a `Normalized`, else `model` itself."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper, when compiled out of place
    return model.model if isinstance(model, Normalized) else model


# --- parsing ---------------------------------------------------------------------------------------------------

def _value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _timm():
    try:
        import timm
    except ImportError as error:
        raise SourceError(f"timm: sources need timm, which is not installed: {TIMM_INSTALL}") from error
    return timm


def _torchvision():
    try:
        import torchvision
    except ImportError as error:
        raise SourceError("torchvision: sources need torchvision, which is not installed: pip install "
                          "torchvision") from error
    return torchvision


def _names(kind):
    if kind == "rkd_fast":
        return list(MODELS)
    if kind == "torchvision":
        return _torchvision().models.list_models()
    return _timm().list_models()


def _nearest(name, names, n=3):
    return difflib.get_close_matches(name, names, n=n, cutoff=0.6)


def parse_arch(arch):
    """(kind, name, extra constructor arguments) of an architecture source; SourceError for an unknown name
    (with the nearest known names) or a missing library."""
    if not isinstance(arch, str) or not arch:
        raise SourceError(f"an architecture must be a non-empty string, got {arch!r}")
    head, *options = arch.split(",")
    kind, name = _split(head)
    extra = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.isidentifier():
            raise SourceError(f"{arch!r}: constructor arguments go as NAME,key=value,..., got {option!r}")
        extra[key] = _value(value)
    if kind == "rkd_fast" and extra:
        raise SourceError(f"{arch!r}: constructor arguments after commas apply to torchvision: and timm: "
                          "architectures; rkd_fast's take options (--width)")
    names = _names(kind)
    if name not in names:
        near = [n if kind == "rkd_fast" else f"{kind}:{n}" for n in _nearest(name, names)]
        # the same name under another source's grammar
        for other, other_prefix in (("rkd_fast", ""), ("torchvision", TORCHVISION), ("timm", TIMM)):
            if other != kind and _exists(other, name):
                near.insert(0, f"{other_prefix}{name}")
        hint = f"; did you mean {' or '.join(near)}?" if near else (
            f"; known: {', '.join(MODELS)}, torchvision:NAME, timm:NAME" if kind == "rkd_fast" else "")
        raise SourceError(f"unknown {'' if kind == 'rkd_fast' else kind + ' '}architecture {name!r}{hint}")
    return kind, name, extra


def _exists(kind, name):
    try:
        return name in _names(kind)
    except SourceError:  # that library is not installed
        return False


def source_kind(spec):
    """"robustbench", "file" (a path that exists, or names a file by its suffix or a directory) or "arch"."""
    spec = str(spec)
    if spec.startswith(ROBUSTBENCH):
        return "robustbench"
    if spec.startswith(TORCHVISION) or spec.startswith(TIMM):
        return "arch"
    if Path(spec).exists() or spec.endswith(WEIGHT_SUFFIXES) or "/" in spec:
        return "file"
    return "arch"


# --- building --------------------------------------------------------------------------------------------------

def _accepts(cls, name):
    return name in inspect.signature(cls.__init__).parameters


def _build_bare(kind, name, kwargs):
    """The torchvision/timm model of `kwargs` (rkd_fast's: num_classes, in_channels, image_size...)."""
    extra = {k: v for k, v in kwargs.items() if k not in ("mean", "std", "in_channels", "image_size")}
    try:
        if kind == "torchvision":
            return _torchvision().models.get_model(name, weights=None, **extra)
        return _timm().create_model(name, pretrained=False, in_chans=kwargs["in_channels"], **extra)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as error:
        if isinstance(error, SourceError):
            raise
        shown = {k: v for k, v in kwargs.items() if k not in ("mean", "std")}
        raise SourceError(f"{kind}:{name} cannot be built with {shown}: {' '.join(str(error).split())}") from error


def _size_argument(kind, name, kwargs):
    """The constructor argument that sets the input size (ViTs, Swin...), or None for a size-agnostic model."""
    with torch.device("meta"):
        model = _build_bare(kind, name, {k: v for k, v in kwargs.items() if k != "image_size"})
    wanted = "image_size" if kind == "torchvision" else "img_size"
    return wanted if _accepts(type(model), wanted) else None


def build_architecture(arch, **kwargs):
    """The architecture `arch` (see the module docstring) built with `kwargs` (as `arch_kwargs` makes them),
    randomly initialised, with ``rkd_info = {"arch": arch, "kwargs": kwargs}`` (what a model file records)."""
    kind, name, extra = parse_arch(arch)
    if kind == "rkd_fast":
        return build_model(name, **kwargs)
    kwargs = dict(kwargs)
    size = {}
    if kwargs.get("image_size") is not None:  # rkd_fast's name for the input side; torchvision's and timm's own
        size = {("image_size" if kind == "torchvision" else "img_size"): kwargs["image_size"]}
    model = _build_bare(kind, name, {**kwargs, **extra, **size})
    channels = None
    if kind == "torchvision":  # torchvision's networks take RGB; grey inputs are repeated to fill them
        if kwargs["in_channels"] not in (1, 3):
            raise SourceError(f"{arch} takes 3-channel inputs, not {kwargs['in_channels']}")
        channels = 3
    model = Normalized(model, kwargs["mean"], kwargs["std"], channels)
    model.rkd_info = {"arch": arch, "kwargs": kwargs}
    return model


def arch_kwargs(arch, info, *, width=None, mean=None, std=None, num_classes=None):
    """The constructor arguments of `arch` for data set `info` (a `rkd_fast.datasets.DatasetInfo`): its classes,
    channels and normalisation (`mean`/`std` override); rkd_fast's: `width` and the data set's stem; torchvision's
    and timm's: the input size for those that take one (ViTs)."""
    kind, name, extra = parse_arch(arch)
    kwargs = {"num_classes": num_classes or info.num_classes, "in_channels": info.in_channels,
              "mean": list(info.mean if mean is None else mean), "std": list(info.std if std is None else std)}
    if kind == "rkd_fast":
        params = inspect.signature(MODELS[name]).parameters
        if width is not None:
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            if "width" not in params and not takes_any:
                raise SourceError(f"--width: architecture {name!r} has no width argument")
            kwargs["width"] = width
        if info.stem is not None and "stem" in params:
            kwargs["stem"] = info.stem
        size = params.get("input_size")
        if size is not None and tuple(size.default) != tuple(info.input_size):  # small_cnn: its head's size
            kwargs["input_size"] = list(info.input_size)
        return kwargs
    if width is not None:
        raise SourceError(f"--width applies to rkd_fast's architectures; give {arch} its arguments as "
                          f"{arch},key=value")
    kwargs.update(extra)
    if _size_argument(kind, name, {**kwargs}) is not None and "img_size" not in extra and "image_size" not in extra:
        kwargs["image_size"] = int(info.input_size[0])
    return kwargs


# --- weights ---------------------------------------------------------------------------------------------------

def _reason(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if "WeightsUnpickler error" in line]  # the informative line, when there
    return (detail or lines or ["no details"])[0]


def load_weights_only(path, what="an rkd_fast model file"):
    """torch.load(path, weights_only=True) on the CPU. A file that does not load (random bytes, truncated, not
    a torch file) is a ValueError naming it and `what` it should have been; a missing file, a directory or a
    permission error stays the OSError it is."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as error:  # a truncated zip archive: "[Errno 22] Invalid argument", with no file name
        raise ValueError(f"{path} is not {what}: it cannot be read, truncated or damaged? "
                         f"({type(error).__name__}: {_reason(error)})") from error
    except Exception as error:  # unpickling errors differ by cause and torch version; all mean "not ours"
        raise ValueError(f"{path} is not {what}: torch.load(weights_only=True) failed "
                         f"({type(error).__name__}: {_reason(error)})") from error


def read_weights(path):
    """The state_dict in `path`: a ``.safetensors`` file, or a ``.pt``/``.pth`` one read with
    ``torch.load(weights_only=True)`` (a dict of tensors, also under a "state_dict" key; a DataParallel
    "module." prefix removed). ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        payload = _read_safetensors(path)[0]
    else:
        payload = load_weights_only(path, "a state_dict file")
        if isinstance(payload, dict) and isinstance(payload.get("format"), str):  # a model file or checkpoint
            raise SourceError(f"{path} is an rkd_fast model file, not a plain state_dict: pass it as the model "
                              "(eval --checkpoint, train --teacher)")
        if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
            payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise SourceError(f"{path} is not a plain state_dict (a dict of parameter names to tensors)")
    if all(key.startswith("module.") for key in payload):
        payload = {key[len("module."):]: value for key, value in payload.items()}
    return payload


def _read_safetensors(path):
    """(tensors, metadata) of a safetensors file."""
    try:
        from safetensors import safe_open
    except ImportError as error:
        raise SourceError(f"{path}: reading .safetensors needs safetensors: pip install safetensors") from error
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # the library's own error types differ by version
        raise SourceError(f"{path} is not a readable .safetensors file ({' '.join(str(error).split())})") from error


def _mismatch(expected, state):
    """'' when `state` has exactly `expected`'s names and shapes ({name: shape}), else a short description."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:2])})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
             f"wrong shapes: {', '.join(wrong[:2])}" if wrong else ""]
    return "; ".join(p for p in parts if p)


def adapt_input_channels(expected, state, where="the weights"):
    """`state` with each convolution whose weights take RGB where the model takes grey (or the reverse) adapted,
    as timm does (`adapt_input_conv`): RGB -> grey sums the three input channels' filters (the same function on a
    grey image as the RGB model on that image copied to three channels), grey -> RGB repeats the filter divided
    by 3. One warning per adapted layer names it; every other entry unchanged."""
    import warnings

    adapted = dict(state)
    for key, shape in expected.items():
        value = state.get(key)
        if value is None or value.dim() != 4 or len(shape) != 4 or tuple(value.shape) == shape:
            continue
        if tuple(value.shape[:1] + value.shape[2:]) != shape[:1] + shape[2:]:
            continue
        if (value.shape[1], shape[1]) == (3, 1):
            adapted[key] = value.sum(dim=1, keepdim=True)
        elif (value.shape[1], shape[1]) == (1, 3):
            adapted[key] = value.repeat(1, 3, 1, 1) / 3
        else:
            continue
        warnings.warn(f"{where}: {key} takes {value.shape[1]} input channels, the model {shape[1]}: adapted as "
                      f"timm's adapt_input_conv does ({'summed over RGB' if shape[1] == 1 else 'repeated, / 3'})",
                      stacklevel=3)
    return adapted


def _expected_shapes(arch, kwargs, inner):
    with torch.device("meta"):
        model = build_architecture(arch, **kwargs)
    model = bare(model) if inner else model
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def closest_source(arch, kwargs, state):
    """Another architecture of the same name (rkd_fast's, torchvision's, timm's) whose weight names `state` has,
    or None."""
    _, name, _ = parse_arch(arch)
    keys = set(state)
    for candidate in (name, TORCHVISION + name, TIMM + name):
        if candidate == arch.split(",")[0] or not _exists(_kind_of(candidate), name):
            continue
        try:
            ckw = _kwargs_for(candidate, kwargs)
            for inner in (False, True):
                if set(_expected_shapes(candidate, ckw, inner)) == keys:
                    return candidate
        except (SourceError, TypeError, RuntimeError):
            continue
    return None


def _split(head):
    """(kind, bare name) of an architecture without its constructor arguments."""
    for prefix, kind in ARCH_PREFIXES.items():
        if head.startswith(prefix):
            return kind, head[len(prefix):]
    return "rkd_fast", head


def _kind_of(arch):
    return _split(arch)[0]


def _kwargs_for(arch, kwargs):
    """`kwargs` of one source made fit for architecture `arch` (classes, channels and normalisation kept)."""
    base = {k: kwargs[k] for k in ("num_classes", "in_channels", "mean", "std")}
    if _kind_of(arch) == "rkd_fast":
        params = inspect.signature(MODELS[arch]).parameters
        return {k: v for k, v in base.items() if k in params}
    return base


def load_weights(model, weights, arch=None):
    """Loads the state_dict file `weights` into `model` (built by `build_architecture`): the model's own keys, or
    the bare torchvision/timm model's. A mismatch is one line, naming the architecture the weights fit when it
    is another source's architecture of the same name."""
    state = weights if isinstance(weights, dict) else read_weights(weights)
    where = "the weights" if isinstance(weights, dict) else str(weights)
    info = model_info(model)
    arch = arch or info.get("arch", type(model).__name__)
    target = model
    if isinstance(model, Normalized) and not any(k.startswith(("normalize.", "model.")) for k in state):
        target = model.model  # the bare model's keys, as torchvision and timm publish them
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if target is model and isinstance(model, Normalized):
        # normalisation buffers absent from the file: the data set's (or the given) ones stay
        state = {**{k: v for k, v in model.state_dict().items() if k.startswith("normalize.")}, **state}
    state = adapt_input_channels(expected, state, where)
    problem = _mismatch(expected, state)
    if problem:
        hint = None
        if info.get("kwargs") is not None:
            hint = closest_source(arch, info["kwargs"], state)
        if hint is not None:
            raise SourceError(f"{where}: the weights do not fit {arch} but look like {hint}'s: use {hint}")
        raise SourceError(f"{where}: the weights do not fit {arch}: {problem}")
    target.load_state_dict(state)
    return model


# --- feature layers --------------------------------------------------------------------------------------------

def module_names(model):
    """The user's names of `model`'s modules (those of the bare model; see the module docstring)."""
    return [name for name, _ in bare(model).named_modules() if name]


def find_module(model, name, side="model"):
    """The module of `model` named `name` (the bare model's name); SourceError listing the nearest names."""
    modules = dict(bare(model).named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    # the nearest names, else the top-level modules (where a user starts looking)
    near = _nearest(name, names, n=5) or [n for n, _ in bare(model).named_children()]
    raise SourceError(f"{side} has no module named {name!r}; available: {', '.join(map(repr, near))}, ... (the "
                      "nearest; `rkd-fast layers` lists them all)")


def token_prefix(model):
    """Leading tokens of a vision transformer's sequence that are not image patches (class, register tokens)."""
    inner = bare(model)
    prefix = getattr(inner, "num_prefix_tokens", None)  # timm
    if prefix is None:
        prefix = 1 if isinstance(getattr(inner, "class_token", None), torch.Tensor) else 0  # torchvision's ViT
    return int(prefix)


def nhwc_maps(model):
    """Whether `model`'s stages give (N, H, W, C) maps: timm's models that say so (``output_fmt`` "NHWC": Swin,
    MambaOut...)."""
    fmt = getattr(bare(model), "output_fmt", None)
    return getattr(fmt, "value", fmt) == "NHWC"


def as_feature_map(output, prefix=0, nhwc=False):
    """A module's output as the (N, C, H, W) map the feature term compares: a map as it is (`nhwc`: an (N, H, W, C)
    one permuted); a token sequence (N, L, C) without its `prefix` non-patch tokens, as a (N, C, s, s) grid when the
    patches make a square, else (N, C, L, 1) (views: no copy)."""
    if output.dim() == 4 and nhwc:
        return output.permute(0, 3, 1, 2)
    if output.dim() != 3:
        return output
    tokens = output[:, prefix:] if 0 < prefix < output.shape[1] else output
    n, length, c = tokens.shape
    side = math.isqrt(length)
    shape = (n, c, side, side) if side * side == length else (n, c, length, 1)
    return tokens.transpose(1, 2).reshape(shape)


# Global pooling: where a classifier's feature maps end (a stem's max-pool is not one).
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten)


def default_feature_layer(model, example=None):
    """The layer whose output the feature term matches by default: rkd_fast's table
    (`rkd_fast.models.DEFAULT_FEATURE_LAYER`); timm's last ``feature_info`` module (the last stage before
    pooling); otherwise the last top-level module before the pooling with a map or token output (torchvision:
    ``layer4``, ``features``, ``encoder``), found by one forward of `example`. None when there is none."""
    arch = model_info(model).get("arch")
    if arch in DEFAULT_FEATURE_LAYER:
        return DEFAULT_FEATURE_LAYER[arch]
    inner = bare(model)
    info = getattr(inner, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return info[-1]["module"]
    children = []
    for name, child in inner.named_children():
        if isinstance(child, _POOLS) or name in ("avgpool", "global_pool"):
            break
        children.append((name, child))
    if not children or example is None:
        return None
    shapes = {}
    def record(name):
        def hook(module, inputs, output):  # returns None: the output passes unchanged
            shapes[name] = output.dim() if isinstance(output, torch.Tensor) else 0
        return hook

    hooks = [child.register_forward_hook(record(name)) for name, child in children]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    ranked = [name for name, _ in children if shapes.get(name, 0) in (3, 4)]
    return ranked[-1] if ranked else None


def layer_shapes(model, example):
    """[(name, type name, output shape or a description)] of every module of the bare model, in registration
    order, from one forward of `example`."""
    inner = bare(model)
    outputs = {}

    def describe(output):
        if isinstance(output, torch.Tensor):
            return tuple(output.shape)
        return type(output).__name__

    def record(name):
        def hook(module, inputs, output):  # returns None: the output passes unchanged
            outputs.setdefault(name, describe(output))
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in inner.named_modules() if name]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, type(module).__name__, outputs.get(name, "not run"))
            for name, module in inner.named_modules() if name]


def check_model(model, example, num_classes, what):
    """One forward of `example` (eval mode, no_grad, training flag restored): SourceError unless `model` takes it
    and returns one logit per class. `what` names the model in the message."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(example)
    except Exception as error:  # a model's own shape assertions, size mismatches...: all mean "not these inputs"
        raise SourceError(f"{what} does not take inputs of shape (N, {', '.join(map(str, example.shape[1:]))}): "
                          f"{type(error).__name__}: {' '.join(str(error).split())}") from error
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SourceError(f"{what} returns outputs of shape {shape}, but the data set has {num_classes} classes: "
                          "one logit per class is expected")


# --- loading any source ----------------------------------------------------------------------------------------
