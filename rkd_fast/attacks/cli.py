"""`rkd-fast eval`: robust accuracy of a model file under white-box L∞ attacks; prints a table and, with
--out, writes DIR/eval.json (command, config, results, library versions, git commit)."""

import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from .evaluate import DEFAULT_ATTACKS, evaluate, parse_attack

DATASETS = ("digits",)


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="model file written by rkd_fast.save_model / export")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS), metavar="NAME",
                        help="clean, fgsm, pgdN, cwN (N steps of eps/4, random start), autoattack; "
                             "space- or comma-separated (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=0.1, help="L∞ radius on the [0, 1] pixel scale "
                                                               "(default: %(default)s)")
    parser.add_argument("--n-examples", type=int, default=None, metavar="N",
                        help="evaluate the first N samples of the split (default: all)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="precision of the model's forward pass during the attacks")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/eval.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _attack_names(values):
    names = [name for value in values for name in value.split(",") if name]
    for name in names:
        parse_attack(name)
    return names


def _versions():
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    from .. import __version__
    versions["rkd_fast"] = __version__
    for module in ("pyautoattack", "torchattacks", "numpy", "sklearn"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "unknown")
        except ImportError:
            pass
    return versions


def _git_commit():
    """(commit, dirty) of the checkout this package runs from, or (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def _command(args, names):
    """The command line that reproduces this run (rebuilt from the parsed arguments, so it is the same
    whether the CLI was called from a shell or through rkd_fast.cli.main)."""
    argv = ["rkd-fast", "eval", "--checkpoint", str(args.checkpoint), "--dataset", args.dataset, "--split",
            args.split, "--attacks", *names, "--eps", repr(args.eps), "--precision", args.precision,
            "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.n_examples is not None:
        argv += ["--n-examples", str(args.n_examples)]
    if args.device is not None:
        argv += ["--device", args.device]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return shlex.join(argv)


def format_table(results, n_examples, eps):
    lines = [f"robust accuracy on {n_examples} samples, L∞ eps = {eps:g}", f"{'attack':<12}{'accuracy':>10}"]
    lines += [f"{name:<12}{100 * acc:>9.2f}%" for name, acc in results.items()]
    return "\n".join(lines)


def run(args):
    from ..checkpoint import atomic_write_json, load_model
    from ..data import load_digits

    try:
        names = _attack_names(args.attacks)
    except (TypeError, ValueError) as error:
        print(f"rkd-fast eval: {error}", file=sys.stderr)
        return 2
    if args.n_examples is not None and args.n_examples < 1:
        print("rkd-fast eval: --n-examples must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.checkpoint, device=device)
    x, y = load_digits(args.split)
    if args.n_examples is not None:
        x, y = x[:args.n_examples], y[:args.n_examples]

    start = time.perf_counter()
    results = evaluate(model, (x, y), attacks=names, eps=args.eps, batch_size=args.batch_size,
                       precision=args.precision, seed=args.seed, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(format_table(results, len(y), args.eps))
    print(f"({elapsed:.1f} s on {device})")

    if args.out is not None:
        commit, dirty = _git_commit()
        report = {
            "command": _command(args, names),
            "config": {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "split": args.split,
                       "attacks": names, "eps": args.eps, "norm": "linf", "n_examples": len(y),
                       "precision": args.precision, "batch_size": args.batch_size, "seed": args.seed,
                       "device": str(device)},
            "model": {"arch": model.rkd_arch, "kwargs": model.rkd_kwargs, **model.rkd_meta},
            "results": results,
            "elapsed_s": round(elapsed, 3),
            "versions": _versions(),
            "git_commit": commit,
            "git_dirty": dirty,
        }
        path = args.out / "eval.json"
        atomic_write_json(path, report)
        print(f"wrote {path}")
    return 0
