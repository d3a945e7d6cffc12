"""`rkd-fast export CKPT OUT`: the student of a training checkpoint, alone, as a model file (rkd_fast.save_model;
.pt or .safetensors), which rkd_fast.load_model and `rkd-fast eval` read."""

import sys
from pathlib import Path

from . import checkpoints


def resolve_checkpoint(source, which="best"):
    """A checkpoint file, or a run directory: its best.pt (which="best") or newest checkpoint ("last")."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise ValueError(f"{source} is neither a checkpoint file nor a run directory")
    if which == "best":
        if not (source / "best.pt").is_file():
            raise ValueError(f"{source} has no best.pt (no robust validation has run yet); use --which last")
        return source / "best.pt"
    found = checkpoints.list_checkpoints(source)
    if not found:
        raise ValueError(f"{source} has no checkpoints")
    return found[0][1]


FORMATS = {"pt": ".pt", "safetensors": ".safetensors"}


def export_checkpoint(source, out, *, which="best", overwrite=False, format=None):
    """Writes the student of checkpoint `source` (a file or a run directory) to the model file `out`; returns
    its path. The file records the student's architecture source and arguments (rkd_fast, torchvision or timm),
    and its meta the method, data set, eps, epoch and validation accuracies. `format`: "pt" (torch.save) or
    "safetensors"; None: from `out`'s suffix (.safetensors, else pt)."""
    from ..model_file import save_model
    from ..teachers import checkpoint_student

    out = Path(out)
    format = format or ("safetensors" if out.suffix == ".safetensors" else "pt")
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "safetensors" and out.suffix != ".safetensors":
        raise ValueError(f"--format safetensors: name the file OUT.safetensors (got {out.name}), the suffix by "
                         "which readers know it")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    path = resolve_checkpoint(source, which)
    model = checkpoint_student(checkpoints.read_checkpoint(path), path)
    return save_model(model, out, **model.rkd_info["meta"])


def add_arguments(parser):
    parser.add_argument("checkpoint", metavar="CKPT", help="a training checkpoint, or a run directory (its best.pt)")
    parser.add_argument("out", metavar="OUT", help="the model file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help="for a run directory: best.pt or the newest checkpoint (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    parser.add_argument("--format", choices=tuple(FORMATS), default=None,
                        help="pt (torch.save, read with weights_only) or safetensors (OUT must end in "
                             ".safetensors); default: from OUT's suffix")


def run(args):
    try:
        path = export_checkpoint(args.checkpoint, args.out, which=args.which, overwrite=args.overwrite,
                                 format=args.format)
    except ValueError as error:
        print(f"rkd-fast export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
