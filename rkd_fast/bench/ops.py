"""Kernel benchmark of rkd_fast.feature_distance: the fused op against the eager reference and
torch.compile(reference), forward + backward, with effective bandwidth beside the copy bandwidth measured in
the same run (the roofline of a memory-bound op).

    python -m rkd_fast.bench.ops [--device cpu|cuda] [--suite quick|cifar|imagenet|all] [--dtypes fp32,bf16]
        [--impls rkd_fast,triton,eager,compile] [--json PATH]

Bytes per fused forward + backward call: read the student, read the teacher, write the student's gradient (the
single-pass kernels move exactly these). rkd_fast is the op with backend="auto" (what users get); cuda and triton
force those backends. The copy is of the same number of bytes, as bytes: ATen's same-dtype copy_ of bfloat16 runs
at a fraction of memory speed (8.0 ms against 2.3 ms for 16 MiB on the 2-core development machine), so it would
be no roofline.

On CPU the copy and the fused op are timed side by side: in alternating rounds, each call by itself, reporting
the median and the fastest call. On a shared machine a parallel region waits whenever another process holds a
core (about 8 ms on the development VM), so medians there say as much about the load as about the op; the fastest
calls are what the hardware does. The eager and compiled references, 10-100 times slower, are timed on their own.

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
import time

import torch

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
    import torch.utils.benchmark as tbench  # here: importing it warns about CUDA_HOME on machines without CUDA

    timer = tbench.Timer(stmt=stmt, globals={"fn": fn, "sync": lambda: _synchronize(device)},
                         num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def side_by_side(fns, device="cpu", min_run_time=0.5, min_rounds=30):
    """Sorted seconds of each single call of each fn, timed in alternating rounds (so that every fn sees the
    same load) until both min_rounds and min_run_time are reached."""
    for fn in fns:  # warm up
        fn()
        _synchronize(device)
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_rounds or time.perf_counter() - start < min_run_time:
        for fn, spent in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            spent.append(time.perf_counter() - t0)
    return [sorted(spent) for spent in times]


def byte_copy(nbytes, device):
    """dst.copy_(src) of nbytes bytes: read + write, the memory roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(numel, dtype, device, min_run_time=0.5):
    """Bytes/s of a copy of numel elements of dtype (as bytes, see the module docstring)."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    seconds = measure(byte_copy(nbytes, device), device, min_run_time)
    return 2 * nbytes / seconds


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
    replays on a GPU; on CPU the copy and the fused op side by side, see the module docstring)."""
    impls = impls or default_impls(device)
    student, teacher = make_inputs(shape, dtype, device)
    nbytes = 3 * student.numel() * student.element_size()
    graphs = torch.device(device).type == "cuda"
    row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": str(device), "mode": mode,
           "timing": "cuda-graph replay" if graphs else "eager call"}
    calls = {impl: functools.partial(forward_backward(impl, mode), student, teacher) for impl in impls}
    if graphs:
        row["copy_GBps"] = copy_bandwidth(student.numel(), dtype, device, min_run_time) / 1e9
        seconds = {impl: measure_graph(call, min_run_time) for impl, call in calls.items()}
        if "rkd_fast" in impls:
            row["rkd_fast_wall_ms"] = measure(calls["rkd_fast"], device, min_run_time) * 1e3
    else:
        fused = [impl for impl in impls if impl in FUSED]
        copy = byte_copy(student.numel() * student.element_size(), device)
        copies, *fused_times = side_by_side([copy] + [calls[impl] for impl in fused], device, 2 * min_run_time)
        row["copy_GBps"] = 2 * student.numel() * student.element_size() / copies[len(copies) // 2] / 1e9
        row["copy_fastest_GBps"] = 2 * student.numel() * student.element_size() / copies[0] / 1e9
        seconds = {impl: spent[len(spent) // 2] for impl, spent in zip(fused, fused_times)}
        for impl, spent in zip(fused, fused_times):
            row[f"{impl}_fastest_GBps"] = nbytes / spent[0] / 1e9
        seconds.update({impl: measure(call, device, min_run_time) for impl, call in calls.items() if impl not in fused})
    for impl in impls:
        row[f"{impl}_ms"] = seconds[impl] * 1e3
        row[f"{impl}_GBps"] = nbytes / seconds[impl] / 1e9
    if "rkd_fast" in impls:
        for impl in impls:
            if impl != "rkd_fast":
                row[f"speedup_vs_{impl}"] = row[f"{impl}_ms"] / row["rkd_fast_ms"]
        row["fraction_of_copy"] = row["rkd_fast_GBps"] / row["copy_GBps"]
        if "copy_fastest_GBps" in row:
            row["fraction_of_copy_fastest"] = row["rkd_fast_fastest_GBps"] / row["copy_fastest_GBps"]
    return row


def format_table(rows):
    impls = [impl for impl in IMPLS if f"{impl}_ms" in rows[0]]
    header = ["shape", "dtype"] + [f"{impl} ms" for impl in impls] + [f"{impl} GB/s" for impl in impls]
    baselines = [impl for impl in impls if f"speedup_vs_{impl}" in rows[0]]
    header += ["copy GB/s", "fused/copy"] + [f"fused × vs {impl}" for impl in baselines]
    fastest = "fraction_of_copy_fastest" in rows[0]
    header += ["fastest: fused GB/s", "copy GB/s", "fused/copy"] if fastest else []
    wall = "rkd_fast_wall_ms" in rows[0]
    header += ["rkd_fast wall ms"] if wall else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = ["×".join(map(str, row["shape"])), row["dtype"]]
        cells += [f"{row[f'{impl}_ms']:.2f}" for impl in impls]
        cells += [f"{row[f'{impl}_GBps']:.1f}" for impl in impls]
        cells += [f"{row['copy_GBps']:.1f}", f"{row.get('fraction_of_copy', float('nan')):.0%}"]
        cells += [f"{row[f'speedup_vs_{impl}']:.1f}" for impl in baselines]
        if fastest:
            cells += [f"{row['rkd_fast_fastest_GBps']:.1f}", f"{row['copy_fastest_GBps']:.1f}",
                      f"{row['fraction_of_copy_fastest']:.0%}"]
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
