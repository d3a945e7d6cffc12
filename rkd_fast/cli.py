"""`rkd-fast <command>` (also `python -m rkd_fast <command>`).

Each command lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`; this file
only wires them to argparse, importing a module when its command runs."""

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "demo": ("rkd_fast.demo", "train a robust teacher and students on the embedded digits data, evaluate, plot"),
    "frontier": ("rkd_fast.frontier", "robustness vs training cost over seeds: robust-kd beside the baselines"),
    "train": ("rkd_fast.train.cli", "train a model with one of the training methods (see its --method)"),
    "export": ("rkd_fast.train.export", "write the student of a training checkpoint as a model file"),
    "eval": ("rkd_fast.attacks.cli", "evaluate a model against white-box L∞/L2 attacks and AutoAttack"),
    "layers": ("rkd_fast.layers", "list a model's module names and output shapes (for --feature-pair)"),
    "bench": ("rkd_fast.bench.cli", "benchmark the fused ops and training steps, write a report"),
    "plot": ("rkd_fast.plots", "draw the curves of training runs (metrics.csv) into a PNG"),
    "info": ("rkd_fast.info", "versions, extension build, CPU capability, GPUs and kernel backends here"),
}


def invoked_command(name):
    """The words `rkd-fast NAME ...` this process was started with when it was started as that command (console
    script or `python -m rkd_fast`), else None: called from Python, the command describes its own arguments."""
    return ["rkd-fast", name, *sys.argv[2:]] if sys.argv[1:2] == [name] else None


def _available():
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser():
    parser = argparse.ArgumentParser(prog="rkd-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except OSError as error:  # disk full, permission denied, read-only file system: wherever a command writes
        print(f"rkd-fast {args.command}: error: {os_error_text(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rkd-fast {args.command}: interrupted", file=sys.stderr)
        return 130


def os_error_text(error):
    """An OSError in one line: the path(s), the system's message and the errno's name."""
    import errno

    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    name = errno.errorcode.get(error.errno) if error.errno else None
    reason = error.strerror or str(error)
    return (f"{paths}: " if paths else "") + reason + (f" ({name})" if name else "")


if __name__ == "__main__":
    sys.exit(main())
