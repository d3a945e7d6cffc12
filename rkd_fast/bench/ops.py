"""Kernel benchmark of rkd_fast.feature_distance: the fused op against the eager reference and
torch.compile(reference), forward + backward, with effective bandwidth beside the copy bandwidth measured in
the same run (the roofline of a memory-bound op).

    python -m rkd_fast.bench.ops [--device cpu|cuda] [--suite quick|cifar|imagenet|all] [--dtypes fp32,bf16]
        [--impls rkd_fast,eager,compile] [--json PATH]

Bytes per fused forward + backward call: read the student, read the teacher, write the student's gradient.
The benchmark cases live here so that `rkd-fast bench` and the pytest-benchmark suite in benchmarks/ time
the same code.
"""

import argparse
import json
import sys

import torch
import torch.utils.benchmark as tbench

from ..ops import _reference
from ..ops.feature_distance import feature_distance

# Feature-map shapes of the layers one distils: ResNet-18 on CIFAR (N=128) and ResNet-50 on ImageNet (N=64).
SUITES = {
    "quick": [(128, 64, 32, 32)],
    "cifar": [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4)],
    "imagenet": [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)],
}
SUITES["all"] = SUITES["cifar"] + SUITES["imagenet"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("rkd_fast", "eager", "compile")


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, min_run_time=0.5):
    """Median seconds per call of fn(), after one warm-up call."""
    fn()
    _synchronize(device)
    # Timer runs on one thread unless told otherwise: measure with the threads the process would use.
    timer = tbench.Timer(stmt="fn(); sync()", globals={"fn": fn, "sync": lambda: _synchronize(device)},
                         num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(numel, dtype, device, min_run_time=0.5):
    """Bytes/s of dst.copy_(src) for a tensor of numel elements: read + write, the memory roofline."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, min_run_time)
    return 2 * src.numel() * src.element_size() / seconds


def make_inputs(shape, dtype, device, channels_last=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    teacher = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if channels_last and len(shape) == 4:
        student = student.contiguous(memory_format=torch.channels_last)
        teacher = teacher.contiguous(memory_format=torch.channels_last)
    return student.requires_grad_(), teacher


def forward_backward(impl, mode="normalized"):
    """A callable (student, teacher) -> d loss / d student for one implementation."""
    if impl == "rkd_fast":
        def loss(s, t):
            return feature_distance(s, t, mode=mode)
    elif impl == "eager":
        def loss(s, t):
            return _reference.feature_distance(s, t, mode=mode)
    elif impl == "compile":
        loss = torch.compile(lambda s, t: _reference.feature_distance(s, t, mode=mode), dynamic=False)
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")

    def step(s, t):
        return torch.autograd.grad(loss(s, t), s)[0]
    return step


def run_case(shape, dtype, device, impls=IMPLS, mode="normalized", min_run_time=0.5):
    """One row: seconds and effective GB/s per implementation, the copy bandwidth, and speed-ups."""
    student, teacher = make_inputs(shape, dtype, device)
    nbytes = 3 * student.numel() * student.element_size()
    row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": str(device), "mode": mode,
           "copy_GBps": copy_bandwidth(student.numel(), dtype, device, min_run_time) / 1e9}
    for impl in impls:
        step = forward_backward(impl, mode)
        seconds = measure(lambda: step(student, teacher), device, min_run_time)
        row[f"{impl}_ms"] = seconds * 1e3
        row[f"{impl}_GBps"] = nbytes / seconds / 1e9
    if "rkd_fast" in impls:
        for impl in impls:
            if impl != "rkd_fast":
                row[f"speedup_vs_{impl}"] = row[f"{impl}_ms"] / row["rkd_fast_ms"]
        row["fraction_of_copy"] = row["rkd_fast_GBps"] / row["copy_GBps"]
    return row


def format_table(rows):
    impls = [impl for impl in IMPLS if f"{impl}_ms" in rows[0]]
    header = ["shape", "dtype"] + [f"{impl} ms" for impl in impls] + [f"{impl} GB/s" for impl in impls]
    baselines = [impl for impl in impls if f"speedup_vs_{impl}" in rows[0]]
    header += ["copy GB/s", "fused/copy"] + [f"fused × vs {impl}" for impl in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = ["×".join(map(str, row["shape"])), row["dtype"]]
        cells += [f"{row[f'{impl}_ms']:.2f}" for impl in impls]
        cells += [f"{row[f'{impl}_GBps']:.1f}" for impl in impls]
        cells += [f"{row['copy_GBps']:.1f}", f"{row.get('fraction_of_copy', float('nan')):.0%}"]
        cells += [f"{row[f'speedup_vs_{impl}']:.1f}" for impl in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--suite", default="quick", choices=sorted(SUITES))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--mode", default="normalized")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    impls = tuple(args.impls.split(","))
    rows = []
    for dtype in args.dtypes.split(","):
        for shape in SUITES[args.suite]:
            rows.append(run_case(shape, DTYPES[dtype], args.device, impls, args.mode, args.min_run_time))
            print(f"  measured {rows[-1]['shape']} {dtype}", file=sys.stderr, flush=True)
    print(f"feature_distance (mode={args.mode}), forward + backward, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, channels_last")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
