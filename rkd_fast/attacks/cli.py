"""`rkd-fast eval`: robust accuracy of a model under white-box L∞ or L2 attacks, on any data set the trainer reads.

The model (rkd_fast.model_source): a model file (``--checkpoint``, from rkd_fast.save_model or `rkd-fast export`,
.pt or .safetensors), a run directory or its training checkpoint (best.pt), a RobustBench model on disk
(``--checkpoint robustbench:DATASET/THREAT/NAME --model-dir DIR``), or an architecture with a plain state_dict
(``--arch NAME|torchvision:NAME|timm:NAME --weights FILE``, .pt/.pth/.safetensors, normalisation from
``--mean/--std`` or the data set's, put inside the model). Prints a table (accuracy and seconds per attack) and, with ``--out DIR``, writes DIR/eval.json:
RobustBench's field names where they exist (dataset, threat_model, eps, n_examples, clean_acc, autoattack_acc;
accuracies as fractions in [0, 1], as robustbench.eval.benchmark returns them), the per-attack accuracies and
seconds, worst_case, the command, the configuration, the model's description, library versions and the git
commit.

Every bad input (option, file, data directory) is a one-line error and exit status 2 before any attack runs, and
nothing is written."""

import dataclasses
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..dirlock import check_out_path, lock_directory
from ..seeding import check_seed
from ..checks import check_count, check_float32, check_number
from ..precision import autocast_dtype
from ._common import NORMS
from .evaluate import (ATTACK_NAMES_HELP, DEFAULT_ATTACKS, DEFAULT_ATTACKS_L2, gradient_only, parse_attack,
                       run_evaluation)
from .sanity import collect_cautions
from ..datasets import SPECS
from .eval_inputs import EVAL_SPLITS, eval_batches, model_from_weights, normalization

REPORT_FORMAT = "rkd_fast.eval"
REPORT_VERSION = 2  # 1: digits only, no format key; 2: adds the RobustBench fields and seconds
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's names


def add_arguments(parser):
    model = parser.add_argument_group("model (--checkpoint, or --arch with --weights)")
    model.add_argument("--checkpoint", metavar="MODEL",
                       help="a model file (rkd_fast.save_model / `rkd-fast export`, .pt or .safetensors), a run "
                            "directory or its best.pt, or robustbench:DATASET/THREAT/NAME (needs robustbench; reads "
                            "MODEL_DIR/DATASET/THREAT/NAME.pt, never downloads)")
    model.add_argument("--model-dir", metavar="DIR", help="robustbench: the model directory (default: ./models)")
    model.add_argument("--arch", help="with --weights: an rkd_fast architecture (small_cnn, resnet18, ...), "
                                      "torchvision:NAME (e.g. torchvision:resnet50) or timm:NAME")
    model.add_argument("--weights", metavar="FILE", help="a plain state_dict file for --arch (.pt, .pth or "
                                                         ".safetensors; torchvision's and timm's own keys accepted)")
    model.add_argument("--num-classes", type=int, help="--arch: outputs of the model (default: the data set's)")
    model.add_argument("--mean", type=float, nargs="+", metavar="M",
                       help="--arch: per-channel mean the model subtracts from [0, 1] inputs (default: the data set's)")
    model.add_argument("--std", type=float, nargs="+", metavar="S", help="--arch: per-channel std (default: the data "
                                                                         "set's)")
    model.add_argument("--width", type=int, help="--arch (rkd_fast architectures): base width (default: its own)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=tuple(EVAL_SPLITS))
    data.add_argument("--data-dir", metavar="DIR", help="the directory holding the data set's files: " + "; ".join(
        f"{name}: {spec.data_dir}" for name, spec in SPECS.items() if spec.data_dir and name in EVAL_SPLITS))
    data.add_argument("--split", help="default: " + ", ".join(f"{split} ({name})"
                                                             for name, split in EVAL_SPLITS.items()))
    data.add_argument("--n-examples", type=int, default=None, metavar="N",
                      help="a fixed class-stratified subset of N samples of the split (default: all)")
    data.add_argument("--image-size", type=int, default=None, help="imagenet: center-crop side (default: 224)")
    data.add_argument("--num-workers", type=int, default=4, help="imagenet: DataLoader workers (default: %(default)s)")

    attack = parser.add_argument_group("attacks")
    attack.add_argument("--norm", choices=NORMS, default="linf", help="threat model (default: %(default)s)")
    attack.add_argument("--eps", type=float, default=None,
                        help="radius on the [0, 1] pixel scale (default, L∞: the data set's, digits 0.1, CIFAR 8/255, "
                             "ImageNet 4/255; L2: required)")
    attack.add_argument("--attacks", nargs="+", default=None, metavar="NAME",
                        help=f"space- or comma-separated: {ATTACK_NAMES_HELP} (default: "
                             f"{' '.join(DEFAULT_ATTACKS)}; L2: {' '.join(DEFAULT_ATTACKS_L2)})")
    attack.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="precision of the model's forward pass during the attacks")
    attack.add_argument("--batch-size", type=int, default=256)
    attack.add_argument("--seed", type=int, default=0)
    attack.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/eval.json")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


# --- checks and preparation (all before any attack runs) ------------------------------------------------------

def _attack_names(values, norm):
    if values is None:
        return list(DEFAULT_ATTACKS if norm == "linf" else DEFAULT_ATTACKS_L2)
    names = [name for value in values for name in value.split(",") if name]
    if not names:
        raise ValueError("--attacks names no attack")
    for name in names:
        parse_attack(name, norm)
    if len(set(names)) != len(names):
        raise ValueError(f"--attacks lists a name twice: {' '.join(names)}")
    return names


def _check_out(out):
    """--out must be a directory, or a path where one can be made: refused before any work, not after it."""
    if out is None:
        return
    check_out_path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {existing}")


def _check_file(option, path):
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file")
    return path


def _check_model_options(args):
    from ..teachers import ROBUSTBENCH_PREFIX, parse_robustbench_spec

    if (args.checkpoint is None) == (args.arch is None):
        raise ValueError("give the model as --checkpoint MODEL or as --arch NAME --weights FILE (one of them)")
    if args.checkpoint is not None:
        for option in ("weights", "num_classes", "mean", "std", "width"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option.replace('_', '-')} applies to --arch, not --checkpoint")
        if args.checkpoint.startswith(ROBUSTBENCH_PREFIX):
            parse_robustbench_spec(args.checkpoint)
            return "robustbench"
        if args.model_dir is not None:
            raise ValueError("--model-dir applies to --checkpoint robustbench:DATASET/THREAT/NAME")
        path = Path(args.checkpoint)
        if path.is_dir():
            if not (path / "best.pt").is_file():
                raise ValueError(f"--checkpoint {path} is a directory without best.pt (a run directory whose robust "
                                 "validation has not run yet? `rkd-fast export --which last` takes its newest "
                                 "checkpoint)")
        elif not path.is_file():
            raise ValueError(f"--checkpoint {path}: no such file")
        return "file"
    if args.weights is None:
        raise ValueError("--arch needs --weights FILE (a plain state_dict)")
    if args.model_dir is not None:
        raise ValueError("--model-dir applies to --checkpoint robustbench:DATASET/THREAT/NAME")
    from ..model_source import parse_arch

    parse_arch(args.arch)
    _check_file("--weights", args.weights)
    if args.num_classes is not None:
        check_count("--num-classes", args.num_classes)
    if args.width is not None:
        check_count("--width", args.width)
    if (args.mean is None) != (args.std is None):
        raise ValueError("--mean and --std go together")
    if args.std is not None and not all(math.isfinite(s) and s > 0 for s in args.std):
        raise ValueError(f"--std must be finite and > 0, got {args.std}")
    if args.mean is not None and not all(math.isfinite(m) for m in args.mean):
        raise ValueError(f"--mean must be finite, got {args.mean}")
    return "weights"


def _load_model(args, source, info, num_classes):
    """(model, its description for the report)."""
    from ..teachers import load_source

    if source != "weights":
        model, description = load_source(args.checkpoint, info, model_dir=args.model_dir, num_classes=num_classes)
        return model.eval(), description
    mean, std = (args.mean, args.std) if args.mean is not None else (info.mean, info.std)
    if len(mean) != len(std) or len(mean) not in (1, info.in_channels):
        raise ValueError(f"--mean/--std: give 1 or {info.in_channels} values each ({info.name} has "
                         f"{info.in_channels} channel(s)), got {len(mean)} and {len(std)}")
    mean, std = [*mean] * (info.in_channels // len(mean)), [*std] * (info.in_channels // len(std))
    model = model_from_weights(args.arch, args.weights, info=info, num_classes=args.num_classes or num_classes,
                               mean=mean, std=std, width=args.width, explicit_normalization=args.mean is not None)
    return model.eval(), {"source": "weights", "arch": args.arch, "weights": str(args.weights),
                          "num_classes": args.num_classes or num_classes, "normalization": normalization(model)}


def _declared_input(model):
    """[(what says so, channels or None, (H, W) or None)]: the input shape the model declares, by what rkd_fast
    recorded when building it, its input normalisation's channels (which would broadcast 1-channel images
    silently), its first convolution, and timm's fixed input size."""
    from torch import nn

    from ..models import InputNormalization, model_info

    found = []
    kwargs = model_info(model).get("kwargs", {})
    if isinstance(kwargs.get("in_channels"), int):
        found.append(("its architecture's in_channels", kwargs["in_channels"], None))
    for module in model.modules():
        if isinstance(module, InputNormalization) and module.mean.numel() > 1:
            found.append(("its input normalisation", module.mean.numel(), None))
            break
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            found.append(("its first convolution", module.in_channels, None))
            break
    config = getattr(model, "pretrained_cfg", None)
    if isinstance(config, dict) and config.get("fixed_input_size") and len(config.get("input_size", ())) == 3:
        found.append(("its fixed input size", None, tuple(config["input_size"][1:])))
    return found


def _check_input_shape(model, input_shape, where):
    """The model's declared input channels (and size, where it fixes one) against the data's: 1-channel digits
    through a 3-channel model run (the normalisation broadcasts them) and report meaningless accuracies."""
    for what, channels, size in _declared_input(model):
        if channels is not None and channels != input_shape[0]:
            raise ValueError(f"the model takes {channels}-channel inputs ({what}), but {where}'s images have "
                             f"{input_shape[0]} channel(s)")
        if size is not None and size != tuple(input_shape[1:]):
            raise ValueError(f"the model takes {size[0]}x{size[1]} inputs ({what}), but {where}'s images are "
                             f"{input_shape[1]}x{input_shape[2]}")


def _check_outputs(model, input_shape, num_classes, where, device):
    """One forward of a zero batch: the model takes the data's inputs and has one output per class."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except (RuntimeError, AssertionError, ValueError) as error:  # models check their input sizes in these ways
        raise ValueError(f"the model does not take {where}'s inputs of shape (N, {', '.join(map(str, input_shape))}): "
                         f"{' '.join(str(error).split())}") from error
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(f"the model returns outputs of shape {tuple(out.shape)}, but {where} has {num_classes} "
                         f"classes: one logit per class is expected")


def prepare(args):
    """Everything `run` needs, checked: raises ValueError (or ImportError, OSError) naming the option or file at
    fault. Reads the data and the model; runs no attack and writes nothing."""
    from ..datasets import dataset_info
    from ..precision import resolve_device

    info = dataset_info(args.dataset)
    plan = {"norm": args.norm, "dataset": args.dataset, "split": args.split or EVAL_SPLITS[args.dataset]}
    if args.eps is None and args.norm != "linf":
        raise ValueError(f"--norm {args.norm} needs --eps (the radius on the [0, 1] pixel scale)")
    plan["eps"] = check_number("--eps", info.eps if args.eps is None else args.eps, strict=True)
    check_float32("--eps", plan["eps"])
    check_seed("--seed", args.seed)
    plan["attacks"] = _attack_names(args.attacks, args.norm)
    check_count("--batch-size", args.batch_size)
    for option in ("n_examples", "image_size"):
        if getattr(args, option) is not None:
            check_count(f"--{option.replace('_', '-')}", getattr(args, option))
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise ValueError(f"--device {args.device}: {error}") from error
    autocast_dtype(args.precision, device)
    _check_out(args.out)
    source = _check_model_options(args)

    batches, n, num_classes = eval_batches(args.dataset, plan["split"], data_dir=args.data_dir,
                                           n_examples=args.n_examples, batch_size=args.batch_size, device=device,
                                           image_size=args.image_size, num_workers=args.num_workers)
    if args.image_size is not None:  # the side ViTs are built for
        info = dataclasses.replace(info, input_size=(args.image_size, args.image_size))
    model, description = _load_model(args, source, info, num_classes)
    model.to(device)
    side = args.image_size or info.input_size[0]
    sized = "image_size" in SPECS[args.dataset].options  # a streamed data set served at any --image-size
    input_shape = (info.in_channels, side, side) if sized else (info.in_channels, *info.input_size)
    _check_input_shape(model, input_shape, f"{args.dataset} {plan['split']}")
    _check_outputs(model, input_shape, num_classes, f"{args.dataset} {plan['split']}", device)
    plan.update(device=device, batches=batches, n_examples=n, model=model, model_description=description)
    return plan


# --- output ----------------------------------------------------------------------------------------------------

def _eps_text(eps):
    k = eps * 255
    return f"{eps:g} ({round(k)}/255)" if abs(k - round(k)) < 1e-6 and round(k) >= 1 else f"{eps:g}"


def format_table(evaluation, plan):
    norm = "L∞" if plan["norm"] == "linf" else "L2"
    lines = [f"robust accuracy on {evaluation.n_examples} samples of {plan['dataset']} {plan['split']}, "
             f"{norm} eps = {_eps_text(plan['eps'])}", f"{'attack':<28}{'accuracy':>10}{'seconds':>10}"]
    for name, acc in evaluation.accuracy.items():
        seconds = f"{evaluation.seconds[name]:10.1f}" if name in evaluation.seconds else ""
        lines.append(f"{name:<28}{100 * acc:>9.2f}%{seconds}")
    return "\n".join(lines)


def _command(args, plan):
    """The command line that reproduces this run, with the defaults it resolved (split, eps, attacks) spelled out:
    the same whether the CLI was called from a shell or through rkd_fast.cli.main."""
    resolved = {"split": plan["split"], "eps": repr(plan["eps"]), "attacks": plan["attacks"]}
    words = ["rkd-fast", "eval"]
    for dest in ("checkpoint", "model_dir", "arch", "weights", "num_classes", "mean", "std", "width", "dataset",
                 "data_dir", "split", "n_examples", "image_size", "num_workers", "norm", "eps", "attacks",
                 "precision", "batch_size", "seed", "device", "out"):
        value = resolved.get(dest, getattr(args, dest))
        if value is None or (dest == "num_workers" and dest not in SPECS[args.dataset].options):
            continue
        words += [f"--{dest.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(words)


def _model_name(args):
    if args.checkpoint is not None:
        return args.checkpoint.split("/")[-1] if args.checkpoint.startswith("robustbench:") else Path(args.checkpoint).stem
    return f"{args.arch}:{Path(args.weights).stem}"


def build_report(args, plan, evaluation, elapsed):
    from ..provenance import package_versions, provenance

    accuracy = evaluation.accuracy
    autoattacks = [name for name in plan["attacks"] if parse_attack(name, plan["norm"])[0] == "autoattack"]
    record = provenance()
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        # RobustBench's names (robustbench.eval.benchmark and its model_info files)
        "model_name": _model_name(args),
        "dataset": plan["dataset"],
        "threat_model": THREAT_MODELS[plan["norm"]],
        "eps": plan["eps"],
        "n_examples": evaluation.n_examples,
        "clean_acc": accuracy.get("clean"),
        "autoattack_acc": accuracy[autoattacks[0]] if autoattacks else None,  # the first AutoAttack version run
        # rkd_fast's own
        "results": accuracy,  # every attack, and worst_case
        "worst_case": accuracy["worst_case"],
        "seconds": {name: round(value, 3) for name, value in evaluation.seconds.items()},
        "elapsed_s": round(elapsed, 3),
        "command": _command(args, plan),
        "config": {"dataset": plan["dataset"], "data_dir": args.data_dir, "split": plan["split"],
                   "n_examples": evaluation.n_examples,
                   "subset": "all" if args.n_examples is None else "class-stratified (rkd_fast.datasets."
                                                                   "stratified_split, seed 0)",
                   "attacks": plan["attacks"], "eps": plan["eps"], "norm": plan["norm"], "precision": args.precision,
                   "batch_size": args.batch_size, "seed": args.seed, "device": str(plan["device"])},
        "model": plan["model_description"],
        "versions": {**record["versions"], **package_versions(("pyautoattack", "torchattacks", "torchvision", "timm",
                                                                "safetensors", "robustbench"))},
        "git_commit": record["git_commit"],
        "git_dirty": record["git_dirty"],
    }


def _fail(error):
    print(f"rkd-fast eval: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def run(args):
    try:
        plan = prepare(args)
    except (ValueError, TypeError, ImportError, OSError) as error:
        return _fail(error)
    # One process per --out: held from before the first attack until eval.json is written.
    try:
        lock = lock_directory(args.out) if args.out is not None else None
    except ValueError as error:
        return _fail(error)
    try:
        return _evaluate_and_report(args, plan)
    finally:
        if lock is not None:
            lock.release()


def _evaluate_and_report(args, plan):
    from ..atomic import atomic_write_json

    start = time.perf_counter()
    try:
        with collect_cautions() as cautions:  # the sanity checks': shown, and kept in eval.json
            evaluation = run_evaluation(plan["model"], plan["batches"], attacks=plan["attacks"], eps=plan["eps"],
                                        norm=plan["norm"], batch_size=args.batch_size, precision=args.precision,
                                        seed=args.seed, progress=not args.no_progress)
    except ValueError as error:  # a later batch's data (NaN, labels outside the classes): nothing is written
        return _fail(error)
    elapsed = time.perf_counter() - start
    caveat = gradient_only(plan["attacks"], plan["norm"])
    if caveat:
        cautions.append(caveat)
    print(format_table(evaluation, plan))
    print(f"({elapsed:.1f} s on {plan['device']})")
    for caution in cautions:
        print(f"warning: {caution}")
    if args.out is not None:
        report = {**build_report(args, plan, evaluation, elapsed), "warnings": cautions}
        path = atomic_write_json(args.out / "eval.json", report)
        print(f"wrote {path}")
    return 0
