"""Writes the benchmark report: DIR/report.json (everything measured), DIR/report.md (the tables) and plots
(matplotlib, Agg backend, so no display is needed)."""

import json
import os
import platform
from pathlib import Path

import torch

from . import ops
from .steps import predict_ms

REPORT_VERSION = 1


def machine_info():
    """CPU model and cores, GPU, and the versions the numbers depend on."""
    from ..provenance import cpu_model

    cpu = cpu_model()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_1_5_15": list(load) if load else None}


def _fmt(value, spec=".2f", missing="—"):
    return missing if value is None else format(value, spec)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _units_text(units):
    return " + ".join(f"{n}·{k}" if n != 1 else k for k, n in units.items()) if units else "—"


def _flop_ratio(s):
    t, st = s.get("teacher_GFLOPs_per_image"), s.get("student_GFLOPs_per_image")
    return f" ({t / st:.1f}× the student's FLOPs)" if t and st else ""


def _scenario_md(s):
    out = [f"### {s['name']}: student {s['student']}, teacher {s['teacher']}",
           f"Batch {s['batch_size']} × 3 × {s['image_size']}², {s['precision']}, "
           f"channels_last={s['channels_last']}, compile={s['compile']}, PGD steps {s['attack_steps']}. "
           f"Student {s['student_params_M']:.2f} M parameters, {_fmt(s['student_GFLOPs_per_image'], '.3f')} "
           f"GFLOP/image; teacher {s['teacher_params_M']:.2f} M, {_fmt(s['teacher_GFLOPs_per_image'], '.3f')} "
           f"GFLOP/image{_flop_ratio(s)}.", ""]
    rows = []
    for name, r in s["steps"].items():
        if "error" in r:
            rows.append([name, "error: " + r["error"].replace("|", "/")[:120]] + [""] * 10)
            continue
        rows.append([name, _fmt(r["ms"], ".1f"), _fmt(r.get("median_ms"), ".1f"), _fmt(r["images_per_s"], ".1f"),
                     _fmt(r.get("peak_MB"), ".0f"), _fmt(r.get("x_natural")), _units_text(r.get("units")),
                     _fmt(r.get("predicted_ms"), ".1f"), _fmt(r.get("measured_over_predicted")),
                     _fmt(r.get("aten_ops"), "d"), _fmt(r.get("ops_x_natural")), _fmt(r.get("host_ms"), ".1f")])
    out.append(_table(["method", "ms/step", "median ms", "images/s", "peak MB", "× natural", "cost model",
                       "predicted ms", "measured/predicted", "aten ops", "ops × natural",
                       "host ms" + (" (CPU: dispatch estimate)" if s.get("device_type", "cpu") == "cpu" else "")],
                      rows))
    if s["missing"]:
        out += ["", f"Not registered in rkd_fast.train.methods at run time (not measured): "
                    f"{', '.join(s['missing'])}."]
    u = s["units_ms"]
    out += ["", "Units (ms): " + ", ".join(f"{k} = {v:.1f}" for k, v in u.items()) + "."]
    return "\n".join(out)


def _cost_summary_md(scenarios):
    """robust-kd against the attack-based methods, predicted by the cost model and measured, per scenario:
    robust-kd pays one teacher forward, as ard/rslad do, and saves ~9 student passes, so its advantage shrinks as
    T_f / S_fb grows."""
    same = next((s for s in scenarios if s["name"] == "cifar-same"), None)
    rows = []
    for s in scenarios:
        steps = dict(s["steps"])
        if same is not None and s is not same:  # teacher-free methods: same student and batch as cifar-same
            steps = {**{k: v for k, v in same["steps"].items() if k not in steps}, **steps}
        mine = steps.get("robust-kd", {})
        if "ms" not in mine:
            continue
        cells = [s["name"], f"{s['units_ms']['T_f'] / s['units_ms']['S_fb']:.2f}"]
        for other in ("pgd-at", "ard", "rslad"):
            theirs = steps.get(other, {})
            # predicted with this scenario's units (a borrowed teacher-free row carries cifar-same's)
            theirs_predicted = predict_ms(theirs["units"], s["units_ms"]) if theirs.get("units") else None
            predicted = (mine["predicted_ms"] / theirs_predicted
                         if mine.get("predicted_ms") and theirs_predicted else None)
            measured = mine["ms"] / theirs["ms"] if "ms" in theirs else None
            cells += [_fmt(predicted), _fmt(measured)]
        rows.append(cells)
    if not rows:
        return "Not measured in this run."
    return _table(["scenario", "T_f / S_fb", "robust-kd / pgd-at predicted", "measured", "robust-kd / ard predicted",
                   "measured", "robust-kd / rslad predicted", "measured"], rows)


def _exactness_md(scenarios):
    rows = []
    for s in scenarios:
        # the same recipe (at the clean input) with the finite difference and with double backprop
        fd = s["steps"].get("robust-kd:clean", {}).get("ms")
        exact = s["steps"].get("robust-kd:exact", {}).get("ms")
        if fd is not None and exact is not None:
            rows.append([s["name"], f"{fd:.1f}", f"{exact:.1f}", f"{exact / fd:.2f}"])
    if not rows:
        return "Not measured in this run."
    return _table(["scenario", "robust-kd:clean (finite difference) ms", "exact Jacobian (double backprop) ms",
                   "exact / fd"], rows)


def _teacher_md(t):
    if not t:
        return "Not measured in this run."
    rows = [[r["setting"], _fmt(r.get("ms"), ".2f"), _fmt(r.get("median_ms"), ".2f"), _fmt(r.get("x_baseline")),
             r.get("error", "")] for r in t["rows"]]
    return (f"Teacher {t['teacher']}, batch {t['batch_size']} × 3 × {t['image_size']}², forward only.\n\n"
            + _table(["setting", "ms (min)", "median ms", "× no_grad fp32", "error"], rows))


def _targets_md(targets):
    if not targets:
        return "No target scenario measured in this run."
    rows = [[t["scenario"], t["ratio"], f"≤ {t['limit']}", _fmt(t["value"]), t["status"]] for t in targets]
    return _table(["scenario", "ratio", "target", "measured", "status"], rows)


def write_report(out_dir, result, plots=True):
    """Writes report.json, report.md and (when plots) step_cost.png and kernels.png into out_dir; returns the
    paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    if plots:
        paths.update(_plots(out, result))
    result = {**result, "plots": sorted(p.name for k, p in paths.items() if k not in ("json", "md"))}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["md"].write_text(render_markdown(result))
    return paths


def render_markdown(r):
    m = r["machine"]
    lines = [f"# rkd-fast benchmark report ({r['mode']}, {r['device']})", "",
             "## Machine", "",
             f"- CPU: {m['cpu']} ({m['cores']} logical cores visible, torch uses {m['torch_threads']} threads)",
             f"- GPU: {m['gpu'] or 'none'}",
             f"- torch {m['torch']}, Triton {m['triton']}, CUDA {m['cuda']}, Python {m['python']}",
             f"- load average at start (1, 5, 15 min): {m['load_average_1_5_15']}",
             f"- wall time of the whole run: {r['wall_s']:.0f} s", "",
             "## Reproduce", "", "```", r["command"], "```", ""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += ["## Training-step cost", "",
              "One optimiser step (SGD, data already on the device) per method, same student, teacher and batch "
              "within a scenario. ms/step is the fastest of the timed steps and every ratio uses it: on a shared "
              "machine other processes only add time, so the minimum is the least noisy estimate (the median "
              "beside it shows the spread). Cost model: a step expressed in units measured "
              "once each: S_f student forward (no graph), S_fb student forward + backward, T_f teacher forward "
              "(no graph), T_fb teacher forward + input backward, O the optimiser update. A measured/predicted "
              "far from 1 says the method does more (or less) than its formula assumes.", ""]
    for s in r["scenarios"]:
        lines += [_scenario_md(s), ""]
    if "step_cost.png" in r.get("plots", []):
        lines += ["![step cost relative to natural training](step_cost.png)", ""]
    lines += ["## Where the time goes", "",
              "robust-kd runs one attack pass and one training pass of the student (two forward + backward "
              "passes, as fgsm-rs and n-fgsm) and one teacher forward; PGD-based methods run k + 1 or k + 2 "
              "student passes (k attack steps) and at most one teacher forward. The saving is "
              "largest when the teacher is cheap and shrinks as T_f / S_fb grows. Predicted from the units "
              "above; pgd-at (teacher-free) is taken from cifar-same where a scenario does not measure it.", "",
              _cost_summary_md(r["scenarios"]), "",
              "## Targets", "", _targets_md(r["targets"]), "",
              "## The price of exactness: finite-difference vs double-backprop Jacobian matching", "",
              _exactness_md(r["scenarios"]), "",
              "## Teacher inference", "", _teacher_md(r.get("teacher_inference")), "",
              "## Kernels: feature_distance forward + backward", ""]
    if r.get("kernels"):
        lines += ["Fused op (rkd_fast) vs the eager reference vs torch.compile(reference); effective GB/s = "
                  "(read student + read teacher + write gradient) / time, against the copy bandwidth measured in "
                  "the same run (rkd_fast.bench.ops). Timing: " + r["kernels"][0].get("timing", "eager call") +
                  (" (GPU time of the work; the eager call's host overhead is in rkd_fast wall ms)"
                   if "rkd_fast_wall_ms" in r["kernels"][0] else "") + ".", "", ops.format_table(r["kernels"]), ""]
        if "kernels.png" in r.get("plots", []):
            lines += ["![kernel bandwidth](kernels.png)", ""]
    else:
        lines += ["Not measured in this run.", ""]
    return "\n".join(lines)


def _plots(out, r):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    scenarios = [s for s in r["scenarios"] if any("x_natural" in v for v in s["steps"].values())]
    if scenarios:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
        for ax, s in zip(axes[0], scenarios):
            names = [n for n, v in s["steps"].items() if "x_natural" in v]
            ax.barh(names, [s["steps"][n]["x_natural"] for n in names], color="tab:blue")
            ax.invert_yaxis()
            ax.set_xlabel("step time × natural training")
            ax.set_title(s["name"], fontsize=9)
        fig.tight_layout()
        paths["step_plot"] = out / "step_cost.png"
        fig.savefig(paths["step_plot"], dpi=100)
        plt.close(fig)
    if r.get("kernels"):
        rows = r["kernels"]
        impls = [i for i in ops.IMPLS if f"{i}_GBps" in rows[0]]
        labels = ["×".join(map(str, row["shape"])) + f" {row['dtype']}" for row in rows]
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
        width = 0.8 / (len(impls) + 1)
        for j, name in enumerate(impls + ["copy"]):
            key = "copy_GBps" if name == "copy" else f"{name}_GBps"
            ax.bar([i + j * width for i in range(len(rows))], [row[key] for row in rows], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=8)
        ax.set_ylabel("effective GB/s")
        ax.legend()
        ax.set_title("feature_distance fwd+bwd vs copy bandwidth")
        fig.tight_layout()
        paths["kernel_plot"] = out / "kernels.png"
        fig.savefig(paths["kernel_plot"], dpi=100)
        plt.close(fig)
    return paths
