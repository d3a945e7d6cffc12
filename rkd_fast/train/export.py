"""`rkd-fast export CKPT OUT`: the student of a training checkpoint, alone, as a model file (rkd_fast.save_model),
which rkd_fast.load_model and `rkd-fast eval` read."""

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


def export_checkpoint(source, out, *, which="best", overwrite=False):
    """Writes the student of checkpoint `source` (a file or a run directory) to the model file `out`; returns
    its path. The file's meta records the method, data set, eps, epoch and validation accuracies."""
    from ..model_file import describe_names, nonfinite_tensors, save_model
    from ..models import build_model

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    path = resolve_checkpoint(source, which)
    state = checkpoints.read_checkpoint(path)
    bad = nonfinite_tensors(state["student"])
    if bad:
        raise ValueError(f"{path}: the student has non-finite weights (NaN or Inf) in {describe_names(bad)}: "
                         "a diverged run; export an earlier checkpoint")
    model = build_model(state["model"]["arch"], **state["model"]["kwargs"])
    model.load_state_dict(state["student"])
    evaluated = [row for row in state["history"] if row.get("val_robust_acc") is not None]
    config = state["config"]
    meta = {"method": config["method"], "dataset": state["dataset"], "eps": state["eps"],
            "epoch": state["position"]["epoch"], "global_step": state["position"]["global_step"],
            "val_clean_acc": evaluated[-1]["val_clean_acc"] if evaluated else None,
            "val_robust_acc": evaluated[-1]["val_robust_acc"] if evaluated else None,
            "source_checkpoint": str(path), "train_config": config}
    return save_model(model, out, **meta)


def add_arguments(parser):
    parser.add_argument("checkpoint", metavar="CKPT", help="a training checkpoint, or a run directory (its best.pt)")
    parser.add_argument("out", metavar="OUT", help="the model file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help="for a run directory: best.pt or the newest checkpoint (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def run(args):
    try:
        path = export_checkpoint(args.checkpoint, args.out, which=args.which, overwrite=args.overwrite)
    except ValueError as error:
        print(f"rkd-fast export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
