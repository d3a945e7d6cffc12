"""`rkd-fast bench`: training-step cost of every method, teacher-inference settings and the fused-op kernels,
written as DIR/report.md, DIR/report.json and plots.

    rkd-fast bench [--quick] [--device cpu|cuda] [--out DIR] [--compile] [--methods natural,kd,...]

Default configurations: on CUDA, bf16 autocast and channels_last, ResNet-18 student at CIFAR shapes (batch 128)
against a ResNet-18 teacher and a WideResNet-34-10 teacher (about 10× the student's FLOPs), and a ResNet-50
student and teacher at ImageNet shapes (batch 64). On CPU, fp32, the CIFAR scenarios, batch 32; ``--quick`` (meant
for a 2-core CPU in under 10 minutes) narrows the ResNet-18s to width 16, takes a WideResNet-34 whose widen
factor gives about 10× the student's FLOPs, a batch of 16, and times fewer steps.
"""

import argparse
import math
import shlex
import sys
import time

import torch

from ..precision import PRECISIONS
from . import ops, report, steps

SCENARIOS = ("cifar-same", "cifar-10x", "imagenet", "imagenet-timm")
CUDA_ONLY = ("imagenet", "imagenet-timm")  # ResNet-50 at 224² is hours of CPU time


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="small configuration (≤ 10 min on a 2-core CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default="bench-report", help="directory of report.md, report.json, plots")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (in place)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                        help="default: on for CUDA, off for CPU")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated step cases (default: all); known: {', '.join(steps.variants())}")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated, of {', '.join(SCENARIOS)} ({', '.join(CUDA_ONLY)} on CUDA only; "
                             "imagenet-timm: timm's ResNet-50 student and teacher, timm:resnet50); default: all "
                             "that apply")
    parser.add_argument("--width", type=int, default=None, help="base width of the ResNet-18 student and teacher")
    parser.add_argument("--wrn-widen", type=int, default=None,
                        help="widen factor of the large WideResNet-34 teacher; default 10 (quick: ~10× FLOPs)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32, help="CIFAR-shape image side")
    parser.add_argument("--attack-steps", type=int, default=10,
                        help="attack steps of the methods that run PGD during training")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (at least)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per case (at least)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each case")
    parser.add_argument("--no-teacher-inference", dest="teacher_inference", action="store_false")
    parser.add_argument("--kernel-shapes", default=None,
                        help="quick|cifar|imagenet|all|none or NxCxHxW,...; default: quick (CPU), all (CUDA)")
    parser.add_argument("--kernel-dtypes", default=None, help="default: fp32 (CPU), fp32,bf16 (CUDA)")
    parser.add_argument("--kernel-impls", default=None,
                        help=f"some of {','.join(ops.IMPLS)} (default: rkd_fast,eager,compile; on CUDA also triton)")
    parser.add_argument("--kernel-min-time", type=float, default=None, help="seconds per kernel timing")
    parser.add_argument("--no-plots", dest="plots", action="store_false")


def _positive(name, value):
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


def _csv(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _kernel_shapes(text):
    if text in ops.SUITES:
        return ops.SUITES[text]
    if text == "none":
        return []
    shapes = []
    for item in _csv(text):
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"--kernel-shapes: {item!r} is not a suite name or an NxCxHxW shape")
        shapes.append(shape)
    return shapes


def resolve(args):
    """The run's settings from the arguments and the device's defaults; ValueError for bad options."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    cuda = device == "cuda"
    cpu_quick = args.quick and not cuda
    for name in ("width", "wrn_widen", "batch_size", "image_size", "attack_steps", "repeats"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("min_time", "kernel_min_time"):  # NaN would never end a timing loop, nor write as strict JSON
        value = getattr(args, name)
        if value is not None and not 0 <= value < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number of seconds >= 0, got {value}")
    known = steps.variants()
    variants = list(known) if args.methods is None else _csv(args.methods)
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(known)}")
    scenarios = _csv(args.scenarios) if args.scenarios else [s for s in SCENARIOS if cuda or s not in CUDA_ONLY]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"--scenarios: unknown {', '.join(bad)}; known: {', '.join(SCENARIOS)}")
    for name in CUDA_ONLY:
        if name in scenarios and not cuda:
            raise ValueError(f"--scenarios {name} runs on CUDA only (ResNet-50 at 224² is hours of CPU time)")
    impls = _csv(args.kernel_impls) if args.kernel_impls else list(ops.default_impls(device))
    if any(i not in ops.IMPLS for i in impls) or not impls:
        raise ValueError(f"--kernel-impls: expected some of {', '.join(ops.IMPLS)}, got {args.kernel_impls!r}")
    dtypes = _csv(args.kernel_dtypes or ("fp32,bf16" if cuda else "fp32"))
    if any(d not in ops.DTYPES for d in dtypes):
        raise ValueError(f"--kernel-dtypes: expected some of {', '.join(ops.DTYPES)}, got {args.kernel_dtypes!r}")
    return {
        "device": device,
        "precision": args.precision or ("bf16" if cuda else "fp32"),
        "channels_last": cuda if args.channels_last is None else args.channels_last,
        "compile": args.compile,
        "variants": variants,
        "scenarios": scenarios,
        "width": args.width or (16 if cpu_quick else 64),
        "wrn_widen": args.wrn_widen,
        "batch_size": args.batch_size or (128 if cuda else 16 if args.quick else 32),
        "image_size": args.image_size,
        "attack_steps": args.attack_steps,
        "timing": {"warmup": args.warmup, "repeats": args.repeats or (3 if cpu_quick else 5),
                   "min_time": args.min_time if args.min_time is not None else (0.0 if cpu_quick else 2.0)},
        "kernel_shapes": _kernel_shapes(args.kernel_shapes or ("all" if cuda else "quick")),
        "kernel_dtypes": dtypes,
        "kernel_impls": impls,
        "kernel_min_time": args.kernel_min_time if args.kernel_min_time is not None else (0.3 if cpu_quick else 1.0),
    }


def _wrn_for_ratio(student, image_size, ratio=10.0):
    """The WideResNet-34 widen factor whose FLOPs are closest to `ratio` × the student's."""
    s = steps.count_flops(student, image_size)
    if not s:
        return 10
    best = min(range(1, 11), key=lambda k: abs(math.log(steps.count_flops(
        steps.ModelSpec("wide_resnet34_10", {"widen_factor": k}), image_size) / (ratio * s))))
    return best


def build_scenarios(cfg):
    w, bs, size = cfg["width"], cfg["batch_size"], cfg["image_size"]
    resnet18 = steps.ModelSpec("resnet18", {} if w == 64 else {"width": w})
    widen = cfg["wrn_widen"] or (10 if w == 64 else _wrn_for_ratio(resnet18, size))
    wrn = steps.ModelSpec("wide_resnet34_10", {} if widen == 10 else {"widen_factor": widen})
    variants = tuple(cfg["variants"])
    built = {
        "cifar-same": steps.Scenario("cifar-same", resnet18, resnet18, bs, size, variants=variants),
        # teacher-free methods cost the same as in cifar-same: only natural (the reference) is measured again
        "cifar-10x": steps.Scenario("cifar-10x", resnet18, wrn, bs, size, variants=tuple(
            v for v in variants if steps.uses_teacher(v) or v == "natural")),
        "imagenet": steps.Scenario("imagenet", steps.ModelSpec("resnet50", {"stem": "imagenet", "num_classes": 1000}),
                                   steps.ModelSpec("resnet50", {"stem": "imagenet", "num_classes": 1000}),
                                   min(bs, 64), 224, num_classes=1000, variants=variants),
        # the same shapes through timm's ResNet-50 (rkd_fast.model_source): its layers, its cost
        "imagenet-timm": steps.Scenario("imagenet-timm", steps.ModelSpec("timm:resnet50", {"num_classes": 1000}),
                                        steps.ModelSpec("timm:resnet50", {"num_classes": 1000}),
                                        min(bs, 64), 224, num_classes=1000, variants=variants),
    }
    return [built[name] for name in cfg["scenarios"]]


def command_line(args):
    """The `rkd-fast bench` command that reproduces this run (the options given, in canonical form)."""
    words = ["rkd-fast", "bench"]
    defaults = vars(build_parser().parse_args([]))
    for key, value in vars(args).items():
        if key.startswith("_") or key == "command" or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flag = {("channels_last", False): "--no-channels-last", ("teacher_inference", False):
                    "--no-teacher-inference", ("plots", False): "--no-plots"}.get((key, value), flag)
            words.append(flag)
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def build_parser():
    parser = argparse.ArgumentParser(prog="rkd-fast bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def run(args):
    start = time.perf_counter()
    try:
        cfg = resolve(args)
    except ValueError as exc:
        print(f"rkd-fast bench: error: {exc}", file=sys.stderr)
        return 2

    def log(message):
        print(f"  {time.perf_counter() - start:6.1f}s {message}", file=sys.stderr, flush=True)

    machine = report.machine_info()
    device = cfg["device"]
    scenarios = build_scenarios(cfg)
    notes = []
    if args.quick and device == "cpu":
        notes.append(f"--quick on CPU: narrow ResNet-18s (width {cfg['width']}, 64 is the standard ResNet-18), "
                     f"batch {cfg['batch_size']}, fp32, few timed steps, to fit the time budget; the large "
                     "teacher's widen factor is chosen for about 10× the student's FLOPs (see each scenario).")
    if device == "cpu":
        notes.append("Peak memory is not reported on CPU: tracemalloc does not see torch's allocations, and the "
                     "process's max-RSS high-water mark only moves when a case exceeds every earlier one.")
    if machine["load_average_1_5_15"] and machine["load_average_1_5_15"][0] > (machine["cores"] or 1):
        notes.append(f"The machine was loaded (1-min load average {machine['load_average_1_5_15'][0]:.1f} on "
                     f"{machine['cores']} cores): timings are noisy and slower than on an idle machine.")
    if cfg["precision"] == "bf16" and any(v.startswith("robust-kd") for v in cfg["variants"]):
        notes.append("Under bf16 autocast robust-kd's finite-difference Jacobian passes run in fp32 (no step is "
                     "accurate in bf16; see rkd_fast/jacobian.py), and the exact variant always runs in fp32.")
    available, missing = steps.split_available(cfg["variants"])
    if missing:
        notes.append(f"Methods not registered in rkd_fast.train.methods when this ran (not measured): "
                     f"{', '.join(sorted({steps.variant_method(v) for v in missing}))}.")
    notes.append("Cost-model formulas of trades, ard and rslad assume the usual algorithms (TRADES: clean "
                 "target + k attack steps + clean and adversarial training passes; ARD/RSLAD: one teacher "
                 "forward + k attack steps + two training passes).")

    records = []
    for scenario in scenarios:
        records.append(steps.run_scenario(
            scenario, device, precision=cfg["precision"], channels_last=cfg["channels_last"],
            compile=cfg["compile"], attack_steps=cfg["attack_steps"], log=log, **cfg["timing"]))

    teacher_rows = None
    if args.teacher_inference and scenarios:
        big = next((s for s in scenarios if s.name == "cifar-10x"), scenarios[0])
        teacher_rows = {"teacher": big.teacher.label(), "batch_size": big.batch_size, "image_size": big.image_size,
                        "rows": steps.teacher_inference(big.teacher, big.batch_size, big.image_size, device,
                                                        log=log, **cfg["timing"])}

    kernels = []
    for dtype in cfg["kernel_dtypes"]:
        for shape in cfg["kernel_shapes"]:
            log(f"[kernels] {'x'.join(map(str, shape))} {dtype}")
            kernels.append(ops.run_case(shape, ops.DTYPES[dtype], device, tuple(cfg["kernel_impls"]),
                                        min_run_time=cfg["kernel_min_time"]))

    result = {
        "version": report.REPORT_VERSION,
        "mode": "quick" if args.quick else "full",
        "device": device,
        "command": command_line(args),
        "settings": {k: v for k, v in cfg.items() if k != "kernel_shapes"} | {
            "kernel_shapes": [list(s) for s in cfg["kernel_shapes"]]},
        "machine": machine,
        "registered_methods": steps.registered_methods(),
        "missing_methods": sorted({steps.variant_method(v) for v in missing}),
        "notes": notes,
        "scenarios": records,
        "targets": steps.targets(records),
        "teacher_inference": teacher_rows,
        "kernels": kernels,
        "wall_s": time.perf_counter() - start,
    }
    paths = report.write_report(args.out, result, plots=args.plots)
    log(f"wrote {', '.join(str(p) for p in paths.values())} ({result['wall_s']:.0f} s)")
    return 0


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
