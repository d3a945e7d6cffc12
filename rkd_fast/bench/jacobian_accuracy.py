"""Accuracy of the finite-difference Jacobian term under each compute dtype, the table behind the default step.

    python -m rkd_fast.bench.jacobian_accuracy [--steps 300] [--samples 360] [--threads N] [--json PATH]

Trains the digits CNN (``small_cnn``) for a fixed number of seeded SGD steps (a few seconds on a CPU), puts it
in eval mode, and on the test split measures per sample the penalty without a teacher, ``‖J·d‖²``
(``jacobian_penalty(..., reduction="none")``, same seeded direction on every side) for a grid of steps. The
step is given as ``c``, the per-pixel move as a fraction of the input's RMS: ``h = c · RMS(x) · sqrt(D)``
for the unit-L2 directions used here (``rkd_fast.jacobian.default_step``). Two comparisons per dtype and c:

- ``vs exact``: against ``estimator="exact"`` (double backprop, float32; float64 for the float64 rows);
- ``vs fp32 FD``: against float32 FD at the same h and d (float16 and bfloat16 run under CPU autocast).

Cells are the median (and 90th percentile) over samples of ``|FD - ref| / ref``. The rows marked ``default``
use ``h=None``; under bfloat16 that call runs its passes in float32 (see ``rkd_fast.jacobian``).
"""

import argparse
import contextlib
import copy
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from ..datasets import load_digits
from ..jacobian import STEP_PER_PIXEL, default_step, jacobian_penalty
from ..models import build_model

C_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 1e-1, 3e-1)
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIRECTION_SEED = 1234


def train_small_cnn(steps=300, batch_size=64, seed=0, lr=0.05):
    """The digits CNN after `steps` seeded SGD steps on the train split (99% test accuracy at 300 steps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("small_cnn")
    x, y = load_digits("train")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _autocast(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


def penalty_rows(model, x, dtype, h=None, estimator="fd", seed=DIRECTION_SEED, **kwargs):
    """Per-sample ‖J·d‖² with the direction drawn from `seed` (the same d for every dtype, h and estimator).
    float64 runs a float64 copy of the model; float16 and bfloat16 run under CPU autocast."""
    if dtype == torch.float64:
        model, x = copy.deepcopy(model).double(), x.double()
    with torch.random.fork_rng(devices=[]), _autocast(dtype), torch.no_grad() if estimator == "fd" else \
            contextlib.nullcontext():
        torch.manual_seed(seed)
        return jacobian_penalty(model, x, h=h, estimator=estimator, reduction="none", **kwargs).detach().double()


def relative_error(value, ref):
    err = (value - ref).abs() / ref.abs().clamp_min(1e-30)
    return err.median().item(), err.quantile(0.9).item()


def measure(model, x, c_grid=C_GRID, dtypes=("fp64", "fp32", "fp16", "bf16")):
    """Rows {dtype, c, h, vs_exact (median, p90), vs_fp32 (median, p90) or None}."""
    exact = {"fp64": penalty_rows(model, x, torch.float64, estimator="exact"),
             "fp32": penalty_rows(model, x, torch.float32, estimator="exact")}
    scale = default_step(x, "l2", torch.float32).item() / STEP_PER_PIXEL[torch.float32]  # RMS·sqrt(D)
    rows = []
    for c in list(c_grid) + ["default"]:
        fp32_cache = {}
        for name in dtypes:
            dtype = DTYPES[name]
            h = None if c == "default" else c * scale
            fd = penalty_rows(model, x, dtype, h=h)
            if c == "default":  # the step the call chose: the float32 one where it fell back to float32
                step_dtype = dtype if dtype in STEP_PER_PIXEL else torch.float32
                h_used, c_used = STEP_PER_PIXEL[step_dtype] * scale, STEP_PER_PIXEL[step_dtype]
            else:
                h_used, c_used = h, c
            ref_exact = exact["fp64" if name == "fp64" else "fp32"]
            vs_fp32 = None
            if name in ("fp16", "bf16"):
                if h_used not in fp32_cache:
                    fp32_cache[h_used] = penalty_rows(model, x, torch.float32, h=h_used)
                vs_fp32 = relative_error(fd, fp32_cache[h_used])
            rows.append({"dtype": name, "c": c_used, "h": h_used, "default": c == "default",
                         "vs_exact": relative_error(fd, ref_exact), "vs_fp32": vs_fp32})
    return rows


def measure_variants(model, x):
    """Defaults in other settings, against estimator="exact": directions, linf, and train-mode BatchNorm (the
    perturbed pass reusing the clean batch statistics)."""
    out = []
    settings = [("gaussian, l2, eval", {"direction": "gaussian"}, False),
                ("rademacher, linf, eval", {"norm": "linf"}, False),
                ("rademacher, l2, train-mode BN", {}, True),
                ("rademacher, l2, train-mode BN, fraction=0.25", {"fraction": 0.25}, True)]
    for label, kwargs, train in settings:
        for name in ("fp32", "fp16", "bf16"):
            m = copy.deepcopy(model).train(train)
            fd = penalty_rows(m, x, DTYPES[name], **kwargs)
            m = copy.deepcopy(model).train(train)
            ref = penalty_rows(m, x, torch.float32, estimator="exact", **kwargs)
            keep = ref > 0  # fraction < 1: the unselected samples are 0 on both sides
            out.append({"setting": label, "dtype": name, "vs_exact": relative_error(fd[keep], ref[keep])})
    return out


def _pct(pair):
    return "—" if pair is None else f"{100 * pair[0]:.3g}% ({100 * pair[1]:.3g}%)"


def markdown(rows, variants):
    lines = ["| dtype | c (per-pixel step / RMS) | h | vs exact: median (p90) | vs fp32 FD same h, d: median (p90) |",
             "|---|---|---|---|---|"]
    for r in rows:
        c = f"**default** {r['c']:.0e}" if r["default"] else f"{r['c']:.0e}"
        lines.append(f"| {r['dtype']} | {c} | {r['h']:.3g} | {_pct(r['vs_exact'])} | {_pct(r['vs_fp32'])} |")
    lines += ["", "| setting (default h) | dtype | vs exact: median (p90) |", "|---|---|---|"]
    for v in variants:
        lines.append(f"| {v['setting']} | {v['dtype']} | {_pct(v['vs_exact'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps of the digits CNN")
    parser.add_argument("--samples", type=int, default=360, help="test samples measured (at most 360)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model = train_small_cnn(args.steps)
    x, y = load_digits("test")
    x, y = x[: args.samples], y[: args.samples]
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    rows, variants = measure(model, x), measure_variants(model, x)
    print(f"small_cnn after {args.steps} SGD steps: test accuracy {100 * acc:.1f}% on {len(x)} samples; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.time() - start:.0f} s\n")
    print(markdown(rows, variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "variants": variants, "accuracy": acc, "steps": args.steps}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
