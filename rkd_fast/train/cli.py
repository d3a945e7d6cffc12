"""`rkd-fast train`: the command-line face of rkd_fast.train.train_model (same options, dashes for underscores)."""

import argparse
import dataclasses
import sys

from ..datasets import (DATASETS, IMAGENET_WORKERS, LOADERS, SPECS, STREAMING_VAL_SIZE, SYNTHETIC_BATCHES,
                        dataset_info)
from ..models import MODELS
from . import rerun
from .config import PRECISIONS, SCHEDULES, RunOptions, TrainConfig
from .methods import METHODS, all_options, teacher_methods

_D = RunOptions()  # the shared options' defaults (each method option has its own, Option.default)


def _options():
    """The names of the options `rkd-fast train` takes now (a method registered later adds its own)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "command")  # args.command: the subcommand


def add_arguments(parser):
    run = parser.add_argument_group("run")
    run.add_argument("--method", choices=sorted(METHODS), default=_D.method, help="training method (default: %(default)s)")
    run.add_argument("--dataset", choices=DATASETS, default=_D.dataset, help="data set (default: %(default)s)")
    run.add_argument("--data-dir", metavar="DIR", default=_D.data_dir,
                     help="directory holding the data set's files: " + "; ".join(
                         f"{name}: {spec.data_dir}" for name, spec in SPECS.items() if spec.data_dir))
    run.add_argument("--download", action="store_true", help="fetch missing files with torchvision (" + ", ".join(
        name for name, spec in SPECS.items() if spec.download) + ")")
    run.add_argument("--val-size", type=int, default=_D.val_size,
                     help="train images held out as val, stratified, fixed seed (" + ", ".join(
                         f"{name}: {spec.val_from_train}" for name, spec in SPECS.items() if spec.val_from_train)
                     + f"); imagenet, synthetic-imagenet: val images the robust validation evaluates, a fixed "
                       f"stratified subset (default: {STREAMING_VAL_SIZE})")
    run.add_argument("--train-size", type=int, default=_D.train_size, metavar="N",
                     help="train on a fixed class-stratified subset of N train images (data sets held as tensors; "
                          "default: all)")
    run.add_argument("--image-size", type=int, default=_D.image_size,
                     help="imagenet, synthetic-imagenet: side of the square input images (default: 224)")
    run.add_argument("--num-workers", type=int, default=_D.num_workers,
                     help=f"imagenet: DataLoader worker processes per process (default: {IMAGENET_WORKERS})")
    run.add_argument("--loader", choices=LOADERS, default=_D.loader,
                     help="imagenet: what reads and augments the training images: pytorch (DataLoader workers, "
                          "the default) or dali (NVIDIA DALI, decoding on the GPU; pip install "
                          "'rkd_fast[dali]'); the same samples, crops and flips either way")
    run.add_argument("--synthetic-batches", type=int, default=_D.synthetic_batches,
                     help=f"synthetic-imagenet: training steps per epoch (default: {SYNTHETIC_BATCHES})")
    run.add_argument("--arch", default=_D.arch,
                     help="student architecture: " + ", ".join(MODELS) + ", torchvision:NAME or timm:NAME (built "
                          "for the data set's classes, channels and normalisation; constructor arguments as "
                          "timm:NAME,key=value) (default: %(default)s)")
    run.add_argument("--width", type=int, default=_D.width,
                     help="base width of an rkd_fast architecture (default: its own)")
    run.add_argument("--teacher", metavar="MODEL", default=_D.teacher,
                     help=f"{', '.join(teacher_methods())}: the teacher: a model file (`rkd-fast export`), a run "
                          "directory, robustbench:DATASET/THREAT/NAME (from ./models), or an architecture as "
                          "for --arch with --teacher-weights")
    run.add_argument("--teacher-weights", metavar="FILE", default=_D.teacher_weights,
                     help="the teacher architecture's weights: a .pt/.pth or .safetensors state_dict (the bare "
                          "torchvision/timm model's keys are accepted)")
    run.add_argument("--teacher-arch", default=_D.teacher_arch, help="refuse a teacher file of another architecture")
    run.add_argument("--epochs", type=int, default=_D.epochs)
    run.add_argument("--batch-size", type=int, default=_D.batch_size)
    run.add_argument("--seed", type=int, default=_D.seed)
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic algorithms (bit-identical reruns and resumes on the same machine)")
    run.add_argument("--device", default=_D.device, help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument("--precision", choices=tuple(PRECISIONS), default=_D.precision,
                     help="fp32, bf16 autocast, or fp16 autocast with loss scaling (CUDA)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    run.add_argument("--compile", action="store_true", help="torch.compile the student")
    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun: SyncBatchNorm, statistics over the global batch (CUDA only)")
    run.add_argument("--dist-timeout", type=float, default=_D.dist_timeout, metavar="SECONDS",
                     help="under torchrun: how long a process waits for the others at a collective before the run "
                          "stops with an error naming the rank that stopped answering (default: %(default)s s)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=_D.lr)
    opt.add_argument("--momentum", type=float, default=_D.momentum)
    opt.add_argument("--nesterov", action="store_true")
    opt.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    opt.add_argument("--schedule", choices=SCHEDULES, default=_D.schedule,
                     help="learning-rate schedule, advanced every step (default: %(default)s)")
    opt.add_argument("--milestones", type=int, nargs="+", default=list(_D.milestones), metavar="EPOCH",
                     help="multistep: epochs at which the rate is multiplied by --gamma (default: 50%%, 75%%)")
    opt.add_argument("--gamma", type=float, default=_D.gamma)
    opt.add_argument("--label-smoothing", type=float, default=_D.label_smoothing)

    attack = parser.add_argument_group("attack (adversarial training methods and the robust validation)")
    usual = ", ".join(f"{name} {dataset_info(name).eps:.4g}" for name in DATASETS)
    attack.add_argument("--eps", type=float, default=_D.eps,
                        help=f"L∞ radius on [0, 1] pixels (default: the data set's: {usual})")
    attack.add_argument("--alpha", type=float, default=_D.alpha, help="PGD step (default: eps/4)")
    attack.add_argument("--attack-steps", type=int, default=_D.attack_steps, help="PGD steps (default: %(default)s)")

    add_method_arguments(parser)

    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=_D.out, required=True,
                     help="run directory: metrics, checkpoints, best.pt")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    out.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    out.add_argument("--eval-every", type=int, default=_D.eval_every,
                     help="robust validation every N epochs (and after the last)")
    out.add_argument("--ckpt-every", type=int, default=_D.ckpt_every,
                     help="also checkpoint every N steps (default: epoch ends only)")
    out.add_argument("--keep", type=int, default=_D.keep, help="rolling checkpoints kept (default: %(default)s)")
    out.add_argument("--max-bad-steps", type=int, default=_D.max_bad_steps, metavar="K",
                     help="skip up to K steps whose loss is NaN or infinite (fp16 overflows) before stopping; "
                          "default 0: the first one stops the run, which then exits with status 1")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    out.add_argument("--tensorboard", action="store_true",
                     help="also log each epoch's metrics for TensorBoard in DIR/tensorboard (needs tensorboard)")
    parser.add_argument("--config", metavar="RUN_JSON",
                        help="rerun the run recorded in RUN_JSON (a run.json, or its run directory): its seed and "
                             "options, overridden by the flags given here; --out names the new run's directory")
    # Defaults wrapped, so that a flag given with the default's value still overrides the --config record.
    rerun.mark_defaults(parser, _options())


def add_method_arguments(parser):
    """The methods' own options (rkd_fast.train.methods), one argument group per set of methods sharing them,
    with the defaults each method gives them."""
    by_owners = {}
    for option, owners in all_options().values():
        by_owners.setdefault(owners, []).append(option)
    for owners, options in by_owners.items():
        names = {option.name for option in options}
        defaults = "; ".join(f"{m}{where}: " + ", ".join(f"{k} {_text(v)}" for k, v in given.items() if k in names)
                             for m in owners
                             for where, given in [("", METHODS[m].DEFAULTS)] + [
                                 (f" on {name}", info.method_defaults.get(m, {})) for name, info in DATASETS.items()]
                             if names & set(given))
        group = parser.add_argument_group(f"{', '.join(owners)} options", f"defaults: {defaults}" if defaults else None)
        for option in options:
            option.add_argument(group)


def _text(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_from_args(args):
    from .config import make_config

    if getattr(args, "config", None):  # the record, then the flags given on the command line
        return make_config({**rerun.read_run_config(args.config), **rerun.given(args, _options())})
    return make_config({name: rerun.unwrap(getattr(args, name)) for name in _options() if hasattr(args, name)})


class _Refusal(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def options_from_flags(words):
    """{option: value} of the `rkd-fast train` flags `words` (e.g. ``["--kd-weight", "0"]``), as `--config`
    reruns take them: only the options the words set, checked as the command checks them (ValueError)."""
    parser = _Refusal(prog="rkd-fast train", add_help=False)
    add_arguments(parser)
    args = parser.parse_args([*words, "--out", "-"])
    return {name: value for name, value in rerun.given(args, _options()).items() if name != "out"}


def run(args):
    from .distributed import PeerTimeout
    from .health import NonFiniteError
    from .trainer import Run

    run_ = None
    try:
        try:  # bad input: a one-line error, exit status 2, nothing written
            run_ = Run(config_from_args(args), tensorboard=args.tensorboard)
            run_.prepare()
        except (ValueError, TypeError) as error:
            print(f"rkd-fast train: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
        try:
            result = run_.train()
        except (NonFiniteError, PeerTimeout) as error:  # a diverged run, or a hung peer: the last checkpoint stands
            print(f"rkd-fast train: error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: the last checkpoint written is intact
            step = run_.position["global_step"]
            print(f"rkd-fast train: interrupted at step {step}; resume with --resume" if run_.out else
                  f"rkd-fast train: interrupted at step {step}", file=sys.stderr)
            return 130
    finally:
        if run_ is not None:
            run_.close()
    best = result.best
    if best and result.rank == 0:  # under torchrun, one line for the job
        print(f"best: epoch {best['epoch']}, val clean {best['val_clean_acc']:.4f}, "
              f"val robust {best['val_robust_acc']:.4f}; train {result.train_seconds:.1f}s; run in {result.out}")
    return 0
