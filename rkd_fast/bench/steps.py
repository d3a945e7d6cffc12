"""Training-step cost cases: one optimiser step (data already on the device) of each training method, with the
same student, teacher and batch, timed per step, with peak memory and a cost model in forward/backward units.

The cases live here so that `rkd-fast bench` and benchmarks/test_step_bench.py time the same code.

The cases come from rkd_fast.train.methods.METHODS at run time (`variants`): each method with its defaults, and
with each of the settings it declares in BENCH_VARIANTS (``robust-kd:-feat``, ``robust-kd:exact``, ...), each with
its own cost model (its cost_units). A method that is no longer registered when its cases run is reported as
missing, not an error.
"""

import contextlib
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..clean_pass import share_clean_statistics
from ..datasets.spec import IMAGENET_MEAN, IMAGENET_STD
from ..model_source import build_architecture, default_feature_layer, parse_arch
from ..models import build_model
from ..precision import PRECISIONS, autocast_factory
from ..train import methods as methods_module

def variants():
    """step case → (registered method, its options): every method with its defaults ("NAME"), then each of the
    BENCH_VARIANTS its class declares itself ("NAME:SUFFIX"; a subclass does not inherit them), in registration
    order."""
    cases = {}
    for name, method in methods_module.METHODS.items():
        cases[name] = (name, {})
        own = vars(method).get("BENCH_VARIANTS", {})
        cases.update({f"{name}:{suffix}": (name, dict(options)) for suffix, options in own.items()})
    return cases


def variant_method(variant):
    """The method a step case runs (its name up to the first ':')."""
    return variant.split(":", 1)[0]


def uses_teacher(variant):
    method = methods_module.METHODS.get(variant_method(variant))
    return method is not None and method.needs_teacher


def cost_units(variant, attack_steps):
    """A step in units: S_f (student forward, no graph), S_fb (student forward + backward), T_f (teacher
    forward, no graph), T_fb (teacher forward + input backward, estimated as T_f · S_fb / S_f) and O (the
    optimiser update), from the method's own cost model (its cost_units). The formulas say what each method is
    expected to run; predicted vs measured in the report shows where that expectation (or the implementation) is
    off. None for an unknown variant or a method without a cost model."""
    cases = variants()
    if variant not in cases:
        return None
    name, options = cases[variant]
    units = methods_module.METHODS[name].cost_units(methods_module.resolve_options(name, options), attack_steps)
    return None if units is None else {**units, "O": 1}


@dataclasses.dataclass
class ModelSpec:
    arch: str
    kwargs: dict

    def build(self, device, channels_last):
        if parse_arch(self.arch)[0] == "rkd_fast":
            model = build_model(self.arch, **self.kwargs)
        else:  # torchvision:, timm: (rkd_fast.model_source): RGB inputs, ImageNet's statistics unless given
            model = build_architecture(self.arch, **{"num_classes": 10, "in_channels": 3, "mean": list(IMAGENET_MEAN),
                                                     "std": list(IMAGENET_STD), **self.kwargs})
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def label(self):
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in ("num_classes",))
        return f"{self.arch}({extra})" if extra else self.arch


@dataclasses.dataclass
class Scenario:
    """A student, a teacher and a batch shape; every method of the scenario uses exactly these."""
    name: str
    student: ModelSpec
    teacher: ModelSpec
    batch_size: int
    image_size: int
    num_classes: int = 10
    variants: tuple = dataclasses.field(default_factory=lambda: tuple(variants()))


def registered_methods():
    return sorted(methods_module.METHODS)


def split_available(variants):
    """(variants whose method is registered now, variants whose method is not)."""
    have = set(methods_module.METHODS)
    return ([v for v in variants if variant_method(v) in have],
            [v for v in variants if variant_method(v) not in have])


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def precision_autocast(device, precision):
    return autocast_factory(device, PRECISIONS[precision])


def make_batch(scenario, device, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(scenario.batch_size, 3, scenario.image_size, scenario.image_size, generator=gen)
    y = torch.randint(0, scenario.num_classes, (scenario.batch_size,), generator=gen)
    x, y = x.to(device), y.to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


class StepCase:
    """One method's optimiser step on a fixed batch: ``case.step()`` runs zero_grad, loss, backward, update."""

    def __init__(self, variant, student, teacher, x, y, scenario, *, attack_steps=10, precision="fp32"):
        method, options = variants()[variant]
        self.variant, self.x, self.y = variant, x, y
        run = methods_module.RunSettings(eps=8 / 255, alpha=None, attack_steps=attack_steps, precision=precision,
                                         label_smoothing=0.0, batch_size=x.shape[0], arch=scenario.student.arch,
                                         teacher_arch=scenario.teacher.arch)
        if "feature_pairs" in methods_module.METHODS[method].options():  # the scenario's own models' layers
            pair = f"{default_feature_layer(student, x[:2])}:{default_feature_layer(teacher, x[:2])}"
            options = {"feature_pairs": (pair,), **options}
        self.method = methods_module.create(method, student, teacher if uses_teacher(variant) else None, run,
                                            x[: min(8, x.shape[0])], precision_autocast(x.device, precision),
                                            **options).to(x.device)
        params = list(student.parameters()) + list(self.method.parameters())
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.student = student.train()
        self.seed = 0

    def close(self):
        """Removes the loss's feature hooks from the shared student and teacher."""
        loss_fn = getattr(self.method, "loss_fn", None)
        if hasattr(loss_fn, "remove_hooks"):
            loss_fn.remove_hooks()

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        total, _ = self.method(self.x, self.y, self.seed)
        total.backward()
        self.optimizer.step()
        self.seed += 1


def time_calls(fn, device, *, warmup=1, repeats=3, min_time=0.0):
    """Seconds of each fn() call: warm-up calls, then at least `repeats` calls and at least min_time s."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(fn, device, *, warmup=1, repeats=3, min_time=0.0):
    """{"ms", "median_ms", "calls", "peak_MB"}: ms is the fastest timed call, the number every ratio here is
    computed from (on a shared machine other processes only ever add time, so the minimum is the least noisy
    estimate of the call's own cost); median_ms beside it shows the spread. peak_MB is torch.cuda.max_memory_allocated on CUDA; on CPU it is None
    (the process's max-RSS high-water mark only moves when a case exceeds every earlier one, so a per-case
    delta would be misleading)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = time_calls(fn, device, warmup=warmup, repeats=repeats, min_time=min_time)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return {"ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3, "calls": len(times),
            "peak_MB": peak}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches (forward and backward): on a GPU each is at least one kernel launch,
    and on any device one trip through the dispatcher."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn):
    """The number of aten ops one fn() call dispatches."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def host_ms(fn, device, ops, *, repeats=3):
    """The host's share of one fn() call. On CUDA: the time until fn returns without waiting for the device
    (what the CPU spends issuing the step; measured, the fastest of `repeats` after a synchronisation). On CPU, where
    every op runs on the host, an estimate of the dispatch overhead alone: `ops` times the measured cost of
    dispatching one tiny op."""
    if torch.device(device).type == "cuda":
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        synchronize(device)
        return min(times) * 1e3
    tiny = torch.zeros(1)
    calls = 2000
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.add(tiny, tiny)
    return ops * (time.perf_counter() - t0) / calls * 1e3


def measure_units(student, teacher, x, y, autocast, device, **timing):
    """Times the cost-model units once each: S_f, S_fb, T_f, T_fb (measured here too, for the exact variant)
    and O (an SGD update of the student's parameters)."""
    params = list(student.parameters())
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # lr 0: the update's cost without moving the weights

    def s_f():
        with torch.no_grad(), autocast():
            student(x)

    def s_fb():
        with autocast():
            loss = F.cross_entropy(student(x).float(), y)
        loss.backward()

    def t_f():
        with torch.no_grad(), autocast():
            teacher(x)

    def t_fb():
        xi = x.detach().requires_grad_()
        with autocast():
            out = teacher(xi)
        torch.autograd.grad(out.float().sum(), xi)

    def o():
        opt.step()

    student.train()
    teacher.eval().requires_grad_(False)
    for p in params:
        p.grad = torch.zeros_like(p)
    units = {}
    for name, fn in (("S_f", s_f), ("S_fb", s_fb), ("T_f", t_f), ("T_fb", t_fb), ("O", o)):
        units[name] = measure(fn, device, **timing)["ms"]
    opt.zero_grad(set_to_none=True)
    return units


def predict_ms(units_count, unit_ms):
    return sum(count * unit_ms[name] for name, count in units_count.items())


def count_flops(spec, image_size, device="cpu"):
    """Forward FLOPs of one image through the model (torch.utils.flop_counter), None when counting fails."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        model = spec.build("meta", False).eval()
        x = torch.rand(1, 3, image_size, image_size, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops()
    except Exception:  # noqa: BLE001 - the count is informational
        return None


def run_scenario(scenario, device, *, precision="fp32", channels_last=False, compile=False, attack_steps=10,
                 warmup=1, repeats=3, min_time=0.0, log=print):
    """Measures every variant of the scenario; returns the scenario's JSON record. A variant that raises is
    recorded with its error instead of stopping the run."""
    torch.manual_seed(0)
    student_init = scenario.student.build(device, channels_last)
    if compile:
        # As the trainer does: robust-kd's Jacobian passes share BatchNorm statistics in one compiled call.
        share_clean_statistics(student_init)
        student_init.compile()  # in place, once: module names (feature hooks) and state_dict keys unchanged
    teacher = scenario.teacher.build(device, channels_last).eval().requires_grad_(False)
    x, y = make_batch(scenario, device, channels_last)
    autocast = precision_autocast(device, precision)
    timing = {"warmup": warmup, "repeats": repeats, "min_time": min_time}
    record = {
        "name": scenario.name, "student": scenario.student.label(), "teacher": scenario.teacher.label(),
        "batch_size": scenario.batch_size, "image_size": scenario.image_size,
        "student_params_M": sum(p.numel() for p in student_init.parameters()) / 1e6,
        "teacher_params_M": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "student_GFLOPs_per_image": _g(count_flops(scenario.student, scenario.image_size)),
        "teacher_GFLOPs_per_image": _g(count_flops(scenario.teacher, scenario.image_size)),
        "device_type": torch.device(device).type, "precision": precision, "channels_last": channels_last,
        "compile": compile, "attack_steps": attack_steps,
    }
    log(f"[{scenario.name}] units")
    record["units_ms"] = measure_units(student_init, teacher, x, y, autocast, device, **timing)
    state = {k: v.clone() for k, v in student_init.state_dict().items()}
    available, missing = split_available(scenario.variants)
    record["missing"] = missing
    rows = {}
    for variant in available:
        log(f"[{scenario.name}] {variant}")
        student_init.load_state_dict(state)  # every method starts from the same weights
        student = student_init
        try:
            case = StepCase(variant, student, teacher, x, y, scenario, attack_steps=attack_steps, precision=precision)
            try:
                row = measure(case.step, device, **timing)
                row["aten_ops"] = count_aten_ops(case.step)
                row["host_ms"] = host_ms(case.step, device, row["aten_ops"])
            finally:
                case.close()
        except Exception as exc:  # noqa: BLE001 - one broken method must not lose the others' numbers
            rows[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        row["images_per_s"] = scenario.batch_size / (row["ms"] / 1e3)
        units = cost_units(variant, attack_steps)
        if units is not None:
            row["units"] = units
        rows[variant] = row
    # The units again after the steps, keeping each one's faster measurement: a burst of load from other
    # processes during one measurement then does not skew every prediction of the scenario.
    log(f"[{scenario.name}] units again")
    student_init.load_state_dict(state)
    again = measure_units(student_init, teacher, x, y, autocast, device, **timing)
    record["units_ms"] = {k: min(v, again[k]) for k, v in record["units_ms"].items()}
    natural = rows.get("natural", {}).get("ms")
    for row in rows.values():
        if "units" in row:
            row["predicted_ms"] = predict_ms(row["units"], record["units_ms"])
            row["measured_over_predicted"] = row["ms"] / row["predicted_ms"]
        if natural and "ms" in row:
            row["x_natural"] = row["ms"] / natural
        natural_ops = rows.get("natural", {}).get("aten_ops")
        if natural_ops and "aten_ops" in row:
            row["ops_x_natural"] = row["aten_ops"] / natural_ops
    record["steps"] = rows
    return record


def _g(flops):
    return None if flops is None else flops / 1e9


# --- teacher inference tricks -------------------------------------------------------------------------------

def teacher_inference(spec, batch_size, image_size, device, *, warmup=1, repeats=3, min_time=0.0, log=print):
    """Forward-only teacher under the settings one can choose for it: grad mode, layout, dtype, and on CUDA
    torch.compile and a captured CUDA graph. Returns rows {"setting", "ms", "x_baseline"}."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=gen).to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = spec.build(device, False).eval().requires_grad_(False)
    model_cl = spec.build(device, True).eval().requires_grad_(False)
    model_cl.load_state_dict(model.state_dict())
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def run(m, inp, grad_ctx, amp=contextlib.nullcontext):
        def fn():
            with grad_ctx(), amp():
                m(inp)
        return fn

    settings = [
        ("no_grad, fp32", run(model, x, torch.no_grad)),
        ("inference_mode, fp32", run(model, x, torch.inference_mode)),
        ("inference_mode, fp32, channels_last", run(model_cl, x_cl, torch.inference_mode)),
        ("inference_mode, bf16", run(model, x, torch.inference_mode, bf16)),
        ("inference_mode, bf16, channels_last", run(model_cl, x_cl, torch.inference_mode, bf16)),
    ]
    if cuda:
        compiled = torch.compile(model_cl)
        settings.append(("compiled, bf16, channels_last", run(compiled, x_cl, torch.no_grad, bf16)))
        settings.append(("CUDA graph, bf16, channels_last", _cuda_graph(model_cl, x_cl, bf16)))
    rows = []
    for name, fn in settings:
        log(f"[teacher inference] {name}")
        try:
            rows.append({"setting": name, **measure(fn, device, warmup=warmup, repeats=repeats, min_time=min_time)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"setting": name, "error": f"{type(exc).__name__}: {exc}"})
    base = rows[0].get("ms")
    for row in rows:
        if base and "ms" in row:
            row["x_baseline"] = row["ms"] / base
    return rows


def _cuda_graph(model, x, amp):
    """A replay of the teacher's forward captured once (static input: a real step copies its batch in)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), amp():
        for _ in range(3):  # warm up cuDNN/cuBLAS outside the capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), amp():
        model(static_x)

    def fn():
        static_x.copy_(x)
        graph.replay()
    return fn


def targets(scenarios):
    """The issues' targets: with a teacher of the student's size robust-kd ≤ 0.4× pgd-at, ard and rslad; with
    the ~10× teacher robust-kd ≤ 0.75× ard and rslad; in every scenario robust-kd's measured/predicted ≤ 1.15 and
    its aten-op count ≤ 2.5× natural's. Each: {"scenario", "ratio", "limit", "value", "status"}."""
    wanted = {"cifar-same": (("pgd-at", 0.4), ("ard", 0.4), ("rslad", 0.4)),
              "cifar-10x": (("ard", 0.75), ("rslad", 0.75))}
    out = []
    by_name = {s["name"]: s for s in scenarios}
    for name, checks in wanted.items():
        steps = by_name.get(name, {}).get("steps", {})
        if name not in by_name:
            continue
        for other, limit in checks:
            if other == "pgd-at" and other not in steps:  # teacher-free: measured in the same-size scenario
                steps = {**by_name.get("cifar-same", {}).get("steps", {}), **steps}
            mine, theirs = steps.get("robust-kd", {}).get("ms"), steps.get(other, {}).get("ms")
            entry = {"scenario": name, "ratio": f"robust-kd / {other}", "limit": limit}
            if mine is None or theirs is None:
                entry.update(value=None, status="missing")
            else:
                value = mine / theirs
                entry.update(value=value, status="pass" if value <= limit else "FAIL")
            out.append(entry)
    # A robust-kd step that costs what its model says, in ops as in time (every scenario that measured it).
    for s in scenarios:
        mine = s.get("steps", {}).get("robust-kd", {})
        for label, key, limit in (("robust-kd measured / predicted", "measured_over_predicted", 1.15),
                                  ("robust-kd aten ops / natural's", "ops_x_natural", 2.5)):
            value = mine.get(key)
            out.append({"scenario": s["name"], "ratio": label, "limit": limit, "value": value,
                        "status": "missing" if value is None else "pass" if value <= limit else "FAIL"})
    return out

