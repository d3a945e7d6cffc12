"""Kernel benchmark of rkd_fast.feature_distance: the fused op against the eager reference and
torch.compile(reference), forward + backward, with effective bandwidth beside the copy bandwidth measured in
the same run (the roofline of a memory-bound op).

    python -m rkd_fast.bench.ops [--device cpu|cuda] [--suite quick|cifar|imagenet|all] [--dtypes fp32,bf16]
        [--impls rkd_fast,triton,eager,compile] [--json PATH]

Bytes per fused forward + backward call: read the student, read the teacher, write the student's gradient.
rkd_fast is the op with backend="auto" (what users get); cuda and triton force those backends.

On a GPU every implementation is captured once in a CUDA graph and the replays are timed: that is the GPU's
time for the work, without the Python, autograd and launch overhead on the host, which at these sizes is as
long as the kernels themselves (about 0.7 ms per forward + backward on the H100 machine, whatever the
implementation). `rkd_fast_wall_ms` keeps the plain eager call's time beside it.
The benchmark cases live here so that `rkd-fast bench` and the pytest-benchmark suite in benchmarks/ time
the same code.
"""

import argparse
import functools
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
IMPLS = ("rkd_fast", "cuda", "triton", "eager", "compile")
FUSED = ("rkd_fast", "cuda", "triton")  # the op itself, by backend


def default_impls(device):
    return ("rkd_fast", "triton", "eager", "compile") if torch.device(device).type == "cuda" else \
        ("rkd_fast", "eager", "compile")


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, min_run_time=0.5):
    """Median seconds per call of fn(), after one warm-up call."""
    fn()
    _synchronize(device)
    # Timer runs on one thread unless told otherwise: measure with the threads the process would use. On a GPU
    # its clock synchronizes at the ends of each block of calls, so launches queue as they would in training
    # (a synchronize per call would add its latency to every kernel).
    stmt = "fn()" if torch.device(device).type == "cuda" else "fn(); sync()"
    timer = tbench.Timer(stmt=stmt, globals={"fn": fn, "sync": lambda: _synchronize(device)},
                         num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(numel, dtype, device, min_run_time=0.5):
    """Bytes/s of dst.copy_(src) for a tensor of numel elements: read + write, the memory roofline."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, min_run_time)
    return 2 * src.numel() * src.element_size() / seconds


def measure_graph(fn, min_run_time=0.5):
    """Median seconds per replay of a CUDA graph that captured one fn() call (after warm-up calls on a side
    stream, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return measure(graph.replay, "cuda", min_run_time)


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
    if impl in FUSED:
        backend = "auto" if impl == "rkd_fast" else impl

        def loss(s, t):
            return feature_distance(s, t, mode=mode, backend=backend)
    elif impl == "eager":
        def loss(s, t):
            return _reference.feature_distance(s, t, mode=mode)
    elif impl == "compile":
        # One compiled graph per case: without the reset, dynamo's per-code cache limit (8) is reached after eight
        # shapes and later cases would silently run the eager reference.
        torch._dynamo.reset()
        loss = torch.compile(lambda s, t: _reference.feature_distance(s, t, mode=mode), dynamic=False)
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")

    def step(s, t):
        return torch.autograd.grad(loss(s, t), s)[0]
    return step


def run_case(shape, dtype, device, impls=None, mode="normalized", min_run_time=0.5):
    """One row: seconds and effective GB/s per implementation, the copy bandwidth, and speed-ups (CUDA graph
    replays on a GPU, see the module docstring)."""
    impls = impls or default_impls(device)
    student, teacher = make_inputs(shape, dtype, device)
    nbytes = 3 * student.numel() * student.element_size()
    graphs = torch.device(device).type == "cuda"
    row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": str(device), "mode": mode,
           "timing": "cuda-graph replay" if graphs else "eager call",
           "copy_GBps": copy_bandwidth(student.numel(), dtype, device, min_run_time) / 1e9}
    for impl in impls:
        step = forward_backward(impl, mode)
        call = functools.partial(step, student, teacher)
        seconds = measure_graph(call, min_run_time) if graphs else measure(call, device, min_run_time)
        row[f"{impl}_ms"] = seconds * 1e3
        row[f"{impl}_GBps"] = nbytes / seconds / 1e9
        if graphs and impl == "rkd_fast":
            row["rkd_fast_wall_ms"] = measure(call, device, min_run_time) * 1e3
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
    wall = "rkd_fast_wall_ms" in rows[0]
    header += ["rkd_fast wall ms"] if wall else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = ["×".join(map(str, row["shape"])), row["dtype"]]
        cells += [f"{row[f'{impl}_ms']:.2f}" for impl in impls]
        cells += [f"{row[f'{impl}_GBps']:.1f}" for impl in impls]
        cells += [f"{row['copy_GBps']:.1f}", f"{row.get('fraction_of_copy', float('nan')):.0%}"]
        cells += [f"{row[f'speedup_vs_{impl}']:.1f}" for impl in baselines]
        cells += [f"{row['rkd_fast_wall_ms']:.2f}"] if wall else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--suite", default="quick", choices=sorted(SUITES))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default=None, help=f"some of {','.join(IMPLS)} (default: rkd_fast,eager,compile; "
                        "on CUDA also triton)")
    parser.add_argument("--mode", default="normalized")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    impls = tuple(args.impls.split(",")) if args.impls else default_impls(args.device)
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impls: unknown {', '.join(unknown)}; known: {', '.join(IMPLS)}")
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
