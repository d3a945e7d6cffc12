"""`rkd-fast frontier`: robustness against training cost, over seeds, for robust-kd and the methods a user would
pick instead, on the embedded digits data with the demo's settings.

For each seed (default 5) every chosen method trains a student of the same architecture, width, epochs and
schedule (the demo's: `small_cnn` width 8, 10 epochs, L∞ eps 0.1, batch 128, one torch thread), the distilling
ones from one PGD-AT teacher (the demo's, trained once). Training runs one model at a time, so its clock
(`train_seconds`: the optimizer steps only) is not shared with anything this command runs; evaluation (clean,
PGD-20 and AutoAttack standard on the whole test split, and a transfer attack: PGD-20 examples made on the seed's
PGD-AT student, applied to every other model) runs afterwards in ``--jobs`` processes. Written into --out:

    results.json      settings, machine, per-seed rows, per-method mean and standard deviation, the criterion
    seeds.csv         one row per (method, seed)
    summary.csv       one row per method: mean and standard deviation of each figure
    frontier.png      AutoAttack accuracy against training seconds, error bars of one standard deviation
    models/           the teacher and every student (rkd_fast.save_model)

A model whose AutoAttack accuracy falls more than MASKING_GAP under its PGD-20 accuracy is flagged: AutoAttack's
gradient-free Square attack and its step-size-free APGD find what a masked gradient hides from PGD.

The criterion (issue "robustness–cost frontier"): robust-kd's mean AutoAttack accuracy ≥ fgsm-rs's, at ≤ 1.5×
its mean training time, and no other method both more robust and faster on average.
"""

import csv
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from .dirlock import holding_lock
from .runfiles import RunFiles

# A study entry: (trainer method, options over the demo's). eps-relative options are given in units of eps.
VARIANTS = {
    "natural": ("natural", {}),
    "kd": ("kd", {}),
    "robust-kd": ("robust-kd", {}),
    # Zhang & Yi's recipe at the clean input, with the trainer's defaults before this study (h = 0.3 L2)
    "robust-kd:clean": ("robust-kd", {"distill_at": "clean", "feat_weight": 3.0, "jac_weight": 1.0,
                                      "kd_temperature": 4.0, "jac_h": 0.3}),
    "fgsm-rs": ("fgsm-rs", {}),
    "n-fgsm": ("n-fgsm", {}),
    "free-at": ("free-at", {}),  # m = 5 replays over 2 epochs: the demo's (rkd_fast.demo.training_config)
    "pgd-2": ("pgd-at", {"attack_steps": 2, "alpha_eps": 0.5}),
    "pgd-at": ("pgd-at", {}),
    "trades": ("trades", {}),
    "ard": ("ard", {}),
    "rslad": ("rslad", {}),
}
DEFAULT_VARIANTS = ("robust-kd", "fgsm-rs", "n-fgsm", "free-at", "pgd-2", "pgd-at", "kd", "trades", "ard", "rslad",
                    "robust-kd:clean")
TRANSFER_SOURCE = "pgd-at"  # the transfer attack's examples come from this student of the same seed
MASKING_GAP = 0.05  # AutoAttack this far under PGD-20: flagged as gradient masking
TIME_RATIO = 1.5  # the criterion: robust-kd at most this times fgsm-rs's training time
SETTINGS = {
    "full": {"seeds": 5, "teacher_width": 16, "student_width": 8, "teacher_epochs": 10, "student_epochs": 10,
             "test_samples": None, "autoattack_samples": None},
    "quick": {"seeds": 2, "teacher_width": 4, "student_width": 4, "teacher_epochs": 1, "student_epochs": 1,
              "test_samples": 30, "autoattack_samples": 10},
}
FIGURES = ("clean", "pgd20", "autoattack", "transfer", "train_seconds")


def add_arguments(parser):
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"), metavar="DIR",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated; known: {', '.join(VARIANTS)} (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 5; --quick: 2)")
    parser.add_argument("--eps", type=float, default=0.1, help="L∞ radius for training and every attack")
    parser.add_argument("--jobs", type=int, default=2, help="evaluation processes (training runs one at a time)")
    parser.add_argument("--device", default="cpu", help="where the models train (default: the demo's cpu); the "
                                                         "evaluation runs on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of training and of each evaluation")
    parser.add_argument("--autoattack-samples", type=int, default=None, metavar="N",
                        help="AutoAttack on a fixed class-stratified subset of N test samples (default: all)")
    parser.add_argument("--teacher", type=Path, default=None, metavar="PATH",
                        help="a teacher model file to reuse instead of training the demo's")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 epoch, a test subset")
    parser.add_argument("--overwrite", action="store_true", help="replace the study already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no per-stage progress lines")


def study_config(variant, settings, eps, seed, teacher_path, device="cpu"):
    """The trainer options of `variant` for `seed`: the demo's student of its method, with the variant's options."""
    from .demo import COMMON, training_config

    method, options = VARIANTS[variant]
    options = dict(options)
    if "alpha_eps" in options:
        options["alpha"] = options.pop("alpha_eps") * eps
    common = {**COMMON, "eps": eps, "seed": seed, "device": device}
    return {**training_config(method, settings, common, teacher_path), **options}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows, variants):
    """Per variant: n, and mean and sample standard deviation of each figure, in the order of `variants`."""
    summary = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        entry = {"method": VARIANTS[variant][0], "n": len(mine)}
        for figure in FIGURES:
            entry[f"{figure}_mean"], entry[f"{figure}_std"] = _mean_std([r.get(figure) for r in mine])
        entry["masking_flags"] = sum(bool(r["masking"]) for r in mine)
        summary[variant] = entry
    return summary


def criterion(summary):
    """The study's question, answered from the means: robust-kd against fgsm-rs and every other method."""
    if "robust-kd" not in summary or "fgsm-rs" not in summary:
        return {"evaluated": False, "reason": "robust-kd and fgsm-rs must both be in the study"}
    mine, fgsm = summary["robust-kd"], summary["fgsm-rs"]
    ratio = mine["train_seconds_mean"] / fgsm["train_seconds_mean"]
    dominated_by = [v for v, s in summary.items() if v != "robust-kd"
                    and s["autoattack_mean"] > mine["autoattack_mean"]
                    and s["train_seconds_mean"] < mine["train_seconds_mean"]]
    result = {"evaluated": True, "robust_kd_autoattack": mine["autoattack_mean"],
              "fgsm_rs_autoattack": fgsm["autoattack_mean"], "time_ratio_to_fgsm_rs": ratio,
              "autoattack_at_least_fgsm_rs": mine["autoattack_mean"] >= fgsm["autoattack_mean"],
              f"time_at_most_{TIME_RATIO}x_fgsm_rs": ratio <= TIME_RATIO, "dominated_by": dominated_by}
    result["met"] = result["autoattack_at_least_fgsm_rs"] and ratio <= TIME_RATIO and not dominated_by
    return result


def _evaluate_job(job):
    """One model's evaluation, in a worker process: clean and PGD-20 on the test split, AutoAttack standard on
    it (or the subset), the transfer examples' accuracy; writes the transfer examples when asked."""
    from .attacks import evaluate, pgd
    from .model_file import load_model

    torch.set_num_threads(job["threads"])
    model = load_model(job["path"])
    x, y = torch.load(job["test"], weights_only=True)
    aa = job["aa_index"]
    scores = evaluate(model, (x, y), attacks=["clean", "pgd20"], eps=job["eps"], seed=job["seed"])
    scores_aa = evaluate(model, (x[aa], y[aa]), attacks=["autoattack"], eps=job["eps"], seed=job["seed"],
                         sanity_checks=False)
    row = {"clean": scores["clean"], "pgd20": scores["pgd20"], "autoattack": scores_aa["autoattack"]}
    if job.get("write_transfer"):
        x_adv = pgd(model, x, y, job["eps"], job["eps"] / 4, 20, random_start=True, seed=job["seed"])
        torch.save(x_adv, job["write_transfer"])
    return job["key"], row


def _transfer_accuracy(path, x_adv, y):
    from .model_file import load_model

    model = load_model(path)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


@holding_lock  # one process per --out
def run_frontier(out, *, variants=DEFAULT_VARIANTS, seeds=None, eps=0.1, jobs=2, threads=1, quick=False,
                 autoattack_samples=None, teacher=None, device="cpu", overwrite=False, progress=True, command=None):
    """The study as a function; returns the results dict (also written to out/results.json)."""
    from .atomic import atomic_write, atomic_write_json
    from .datasets import load_digits, stratified_subset
    from .demo import COMMON, Stages, training_config
    from .model_file import save_model
    from .plots import plot_frontier
    from .train import train_model
    from .bench.report import machine_info
    from .info import provenance

    out = Path(out)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--methods lists a method twice: {', '.join(variants)}")
    settings = dict(SETTINGS["quick" if quick else "full"])
    seeds = settings["seeds"] if seeds is None else seeds
    for name, value, low in (("seeds", seeds, 1), ("jobs", jobs, 1), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name} must be an int >= {low}, got {value!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"--eps must be a number in (0, 1), got {eps!r}")
    if autoattack_samples is not None:
        if autoattack_samples < 0:
            raise ValueError(f"--autoattack-samples must be >= 0, got {autoattack_samples}")
        settings["autoattack_samples"] = autoattack_samples
    if teacher is not None and not Path(teacher).is_file():
        raise ValueError(f"--teacher {teacher} is not a file")
    if teacher is not None:  # a file that is not a model is refused here, not after the study's files are made
        _check_teacher(teacher)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    files = RunFiles(out)
    files.names()  # a record that names anything outside the study's own files is refused before anything runs
    if files.exists() and not overwrite:
        raise ValueError(f"--out {out} holds another study; pass --overwrite to replace it or choose another --out")
    if files.exists():
        files.remove_all()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()  # the load average before the study starts

    x, y = load_digits("test")
    if settings["test_samples"]:
        keep = stratified_subset(y, settings["test_samples"])
        x, y = x[keep], y[keep]
    aa_index = stratified_subset(y, settings["autoattack_samples"] or 0)
    test_file = files.add(out / "models" / "test.pt")
    files.written(atomic_write(test_file, lambda f: torch.save((x, y), f)))

    stages = Stages(progress, prefix="frontier")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        teacher_path = Path(teacher) if teacher is not None else files.add(out / "models" / "teacher.pt")
        if teacher is None:
            cfg = training_config("teacher", settings, {**COMMON, "eps": float(eps), "seed": 0, "device": device},
                                  None)
            result = stages.run("train teacher", lambda: train_model(cfg))
            files.written(save_model(result.model, teacher_path, name="teacher", method="pgd-at", eps=float(eps)))
        rows = []
        for seed in range(seeds):
            for variant in variants:
                cfg = study_config(variant, settings, float(eps), seed, teacher_path, device)
                result = stages.run(f"train {variant} seed {seed}", lambda cfg=cfg: train_model(cfg))
                path = files.add(out / "models" / f"{variant}-seed{seed}.pt")
                files.written(save_model(result.model, path, name=variant, method=cfg["method"], seed=seed,
                                         eps=float(eps), train_seconds=result.train_seconds))
                rows.append({"variant": variant, "method": cfg["method"], "seed": seed,
                             "train_seconds": result.train_seconds, "path": str(path)})
    finally:
        torch.set_num_threads(saved_threads)

    # Evaluation: every model in a worker; the transfer source writes its PGD-20 examples of the test split.
    jobs_list = []
    for i, row in enumerate(rows):
        job = {"key": i, "path": row["path"], "test": str(test_file), "aa_index": aa_index, "eps": float(eps),
               "seed": row["seed"], "threads": threads}
        if row["variant"] == TRANSFER_SOURCE:
            job["write_transfer"] = str(files.add(out / "models" / f"transfer-seed{row['seed']}.pt"))
        jobs_list.append(job)
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for key, scores in pool.map(_evaluate_job, jobs_list):
            rows[key].update(scores)
            if progress:
                r = rows[key]
                print(f"[frontier] evaluated {r['variant']} seed {r['seed']}: clean {r['clean']:.3f} "
                      f"PGD-20 {r['pgd20']:.3f} AA {r['autoattack']:.3f}", flush=True)
    evaluation_seconds = time.perf_counter() - t
    files.written(*[job["write_transfer"] for job in jobs_list if "write_transfer" in job])
    for row in rows:
        source = out / "models" / f"transfer-seed{row['seed']}.pt"
        row["transfer"] = None
        if row["variant"] != TRANSFER_SOURCE and source.is_file():
            row["transfer"] = _transfer_accuracy(row["path"], torch.load(source, weights_only=True), y)
        row["masking"] = row["autoattack"] < row["pgd20"] - MASKING_GAP
        row["path"] = str(Path(row["path"]).relative_to(out))

    summary = summarize(rows, variants)
    results = {
        "eps": float(eps), "norm": "linf", "settings": settings, "seeds": seeds, "variants": list(variants),
        "options": {v: VARIANTS[v][1] for v in variants}, "threads": threads, "jobs": jobs,
        "device": device, "test_samples": len(y), "autoattack_samples": len(aa_index), "autoattack_version": "standard",
        "transfer_source": TRANSFER_SOURCE, "masking_gap": MASKING_GAP,
        "rows": rows, "summary": summary, "criterion": criterion(summary),
        "stages": stages.records, "evaluation_seconds": round(evaluation_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine, "load_average_at_end": machine_info()["load_average_1_5_15"]},
        "command": list(command) if command else ["rkd-fast", "frontier", "--out", str(out)],
        "quick": bool(quick), **provenance(),
    }
    files.written(
        _write_csv(files.add(out / "seeds.csv"), rows, ["variant", "method", "seed", *FIGURES, "masking", "path"]),
        _write_csv(files.add(out / "summary.csv"), [{"variant": v, **s} for v, s in summary.items()],
                   ["variant", "method", "n", *[f"{f}_{k}" for f in FIGURES for k in ("mean", "std")],
                    "masking_flags"]),
        atomic_write_json(files.add(out / "results.json"), results))
    figure = files.add(out / "frontier.png")
    plot_frontier([{"method": v, "aa_mean": s["autoattack_mean"], "aa_std": s["autoattack_std"],
                    "seconds_mean": s["train_seconds_mean"], "seconds_std": s["train_seconds_std"]}
                   for v, s in summary.items()], figure,
                  title=f"digits, {seeds} seeds: AutoAttack accuracy vs training cost")
    files.written(figure)
    return results


def _check_teacher(teacher):
    from .datasets import dataset_info
    from .demo import COMMON
    from .teachers import load_teacher

    info = dataset_info(COMMON["dataset"])
    try:
        load_teacher(teacher, num_classes=info.num_classes, in_channels=info.in_channels, device="cpu")
    except (ValueError, TypeError) as error:
        raise ValueError(f"--teacher {teacher}: {error}") from error


def _write_csv(path, rows, columns):
    from .atomic import atomic_write

    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write(path, write, text=True)


def format_table(results):
    """The study's table: mean ± standard deviation per method (accuracies in %)."""
    header = (f"{'method':<16} {'clean':>12} {'PGD-20':>12} {'AutoAttack':>12} {'transfer':>12} {'train s':>13} "
              f"{'× fgsm-rs':>9}")
    lines = [header, "-" * len(header)]
    base = results["summary"].get("fgsm-rs", {}).get("train_seconds_mean")

    def cell(s, figure, scale=100.0, digits=1):
        mean, std = s[f"{figure}_mean"], s[f"{figure}_std"]
        return "—" if mean is None else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"

    for variant, s in results["summary"].items():
        ratio = f"{s['train_seconds_mean'] / base:.2f}" if base else "—"
        flag = "  masking?" if s["masking_flags"] else ""
        lines.append(f"{variant:<16} {cell(s, 'clean'):>12} {cell(s, 'pgd20'):>12} {cell(s, 'autoattack'):>12} "
                     f"{cell(s, 'transfer'):>12} {cell(s, 'train_seconds', 1.0, 2):>13} {ratio:>9}{flag}")
    c = results["criterion"]
    lines.append(f"{results['seeds']} seeds; L∞ eps {results['eps']}; clean/PGD-20 on {results['test_samples']} test "
                 f"samples, AutoAttack (standard) on {results['autoattack_samples']}; transfer: PGD-20 examples of "
                 f"the {TRANSFER_SOURCE} student of the same seed")
    if c.get("evaluated"):
        lines.append(f"criterion {'met' if c['met'] else 'NOT met'}: robust-kd AA {100 * c['robust_kd_autoattack']:.1f} "
                     f"vs fgsm-rs {100 * c['fgsm_rs_autoattack']:.1f}, time {c['time_ratio_to_fgsm_rs']:.2f}× "
                     f"fgsm-rs (≤ {TIME_RATIO}), dominated by: {', '.join(c['dominated_by']) or 'none'}")
    return "\n".join(lines)


def run(args):
    from .cli import invoked_command

    command = invoked_command("frontier")
    variants = tuple(v.strip() for v in args.methods.split(",") if v.strip())
    try:
        results = run_frontier(args.out, variants=variants, seeds=args.seeds, eps=args.eps, jobs=args.jobs,
                               threads=args.threads, quick=args.quick, autoattack_samples=args.autoattack_samples,
                               teacher=args.teacher, device=args.device, overwrite=args.overwrite,
                               progress=not args.no_progress,
                               command=command)
    except (TypeError, ValueError) as error:
        print(f"rkd-fast frontier: error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"total: {results['total_seconds']:.0f} s (evaluation {results['evaluation_seconds']:.0f} s in "
          f"{results['jobs']} processes); wrote {args.out}/results.json, seeds.csv, summary.csv, frontier.png")
    return 0
