"""`rkd-fast frontier`: robustness against training cost, over seeds, for robust-kd and the methods a user would
pick instead, on a small data set (default: the embedded digits) with the demo's settings for it
(rkd_fast.studies.SETTINGS).

For each seed (default: the data set's, 5) every chosen method trains a student of the same architecture, width,
epochs and schedule (digits: `small_cnn` width 8, 10 epochs, L∞ eps 0.1, batch 128, one torch thread), the
distilling ones from one PGD-AT teacher (the demo's, trained once, or --teacher: a model file, such as the one
committed beside a study's records). Training runs one model at a time, so its clock
(`train_seconds`: the optimizer steps only) is not shared with anything this command runs; evaluation (clean,
PGD-20 and AutoAttack standard on the whole test split, and a transfer attack: PGD-20 examples made on the seed's
PGD-AT student, or on the teacher when pgd-at is not in the study, applied to every other model) runs afterwards in
``--jobs`` processes, the teacher's too. Written into --out:

    results.json      settings, machine, per-seed rows, per-method mean and standard deviation, the criterion
    seeds.csv         one row per (method, seed)
    summary.csv       one row per method: mean and standard deviation of each figure
    frontier.png      AutoAttack accuracy against training seconds, error bars of one standard deviation
    models/           the teacher and every student (rkd_fast.save_model, with the commit it was trained at),
                      and each model's scores (models/NAME.json) once evaluated

--resume continues a study in --out: the models and scores already there are kept (they must come from this
commit and the same settings; anything else is refused), the rest are trained and evaluated, so a study can run
over several sessions. A copy of a study without its transfer examples (31 MB for Fashion-MNIST's, left out of the
records) gets them written again by their source; its scores are kept.

A model whose AutoAttack accuracy falls more than MASKING_GAP under its PGD-20 accuracy is flagged: AutoAttack's
gradient-free Square attack and its step-size-free APGD find what a masked gradient hides from PGD. The evaluation's
sanity checks (rkd_fast.attacks.sanity) are kept per model too, as its "warnings".

--variant NAME=METHOD [FLAGS] adds a study entry of the user's own: METHOD with `rkd-fast train` flags over the
study's settings (e.g. ``--variant "rkd-no-kd=robust-kd --kd-weight 0"``), so a table of tries is a study like any
other, resumable and recorded.

The criterion: robust-kd's mean AutoAttack accuracy ≥ the best single-step baseline's (SINGLE_STEP, those in the
study) + MARGIN, at ≤ 1.5× fgsm-rs's mean training time, and no other method both more robust and faster on average.
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
from .studies import SETTINGS, Stages, check_eps, check_int, check_samples, plain, training_config

# The study's entries: rkd_fast.train.methods.study_variants() (each method and its declared STUDY_VARIANTS).
TRANSFER_SOURCE = "pgd-at"  # the transfer attack's examples come from this student of the same seed
MASKING_GAP = 0.05  # AutoAttack this far under PGD-20: flagged as gradient masking
TIME_RATIO = 1.5  # the criterion: robust-kd at most this times fgsm-rs's training time
SINGLE_STEP = ("fgsm-rs", "n-fgsm")  # the criterion: the baselines that cost what robust-kd costs
MARGIN = 0.01  # the criterion: robust-kd's AutoAttack at least this above the best of them
# Options a --variant cannot change: they are the study's (the same for every entry) or the entry's name
STUDY_OWNED = ("method", "dataset", "data_dir", "download", "eps", "seed", "device", "out", "resume", "overwrite",
               "config", "progress")
FIGURES = ("clean", "pgd20", "autoattack", "transfer", "train_seconds")


def add_arguments(parser):
    from .train.methods import default_study_variants, study_variants

    parser.add_argument("--dataset", default="digits", choices=tuple(SETTINGS),
                        help="data set (default: %(default)s); its settings: rkd_fast.studies.SETTINGS")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="where the data set's files are, when it reads files (as `rkd-fast train`)")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"), metavar="DIR",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(default_study_variants()),
                        help=f"comma-separated; known: {', '.join(study_variants())} (default: %(default)s)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD [FLAGS]",
                        help="an entry of your own, also run: METHOD with `rkd-fast train` flags over the study's "
                             "settings, e.g. \"rkd-no-kd=robust-kd --kd-weight 0\" (repeatable)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default: the data set's, 5; "
                                                                "--quick: 2)")
    parser.add_argument("--eps", type=float, default=None, help="L∞ radius for training and every attack "
                                                                "(default: the data set's)")
    parser.add_argument("--jobs", type=int, default=2, help="evaluation processes (training runs one at a time)")
    parser.add_argument("--device", default="cpu", help="where the models train (default: the demo's cpu); the "
                                                         "evaluation runs on the CPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of training; the --jobs evaluation processes share them (each gets "
                             "threads // jobs, at least 1: more threads than cores spin and run several times slower)")
    parser.add_argument("--autoattack-samples", type=int, default=None, metavar="N",
                        help="AutoAttack on a fixed class-stratified subset of N test samples (default: the data "
                             "set's; digits: all)")
    parser.add_argument("--teacher", type=Path, default=None, metavar="PATH",
                        help="a teacher model file to reuse instead of training the demo's (e.g. a study's "
                             "committed docs/frontier/DATASET/teacher.pt)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 epoch, a test subset")
    parser.add_argument("--resume", action="store_true",
                        help="continue the study in --out: keep its finished models and scores (same commit and "
                             "settings), train and evaluate the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace the study already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no per-stage progress lines")


def parse_variant(text):
    """``NAME=METHOD [FLAGS]`` -> (name, (method, options)), or a ValueError naming what is wrong."""
    import re
    import shlex

    from .train.cli import options_from_flags
    from .train.methods import METHODS

    name, sep, definition = text.partition("=")
    name = name.strip()
    words = shlex.split(definition) if sep else []
    if not re.fullmatch(r"[a-z0-9][a-z0-9+:._-]*", name) or not words:
        raise ValueError(f"--variant {text!r}: expected NAME=METHOD [FLAGS], NAME in lowercase letters, digits and "
                         "+:._- (it names the model files)")
    method = words[0]
    if method not in METHODS:
        raise ValueError(f"--variant {name}: unknown method {method!r}; known: {', '.join(METHODS)}")
    try:
        options = options_from_flags(["--method", method, *words[1:]])
    except ValueError as error:
        raise ValueError(f"--variant {name}: {error}") from error
    if options.pop("method") != method:
        raise ValueError(f"--variant {name}: the method is the word after '=', not a --method flag")
    owned = sorted(set(options) & set(STUDY_OWNED))
    if owned:
        raise ValueError(f"--variant {name}: {', '.join(owned)} belong to the study (the same for every entry)")
    return name, (method, options)


def model_path(out, variant, seed):
    """The model file of an entry's seed. Windows forbids ':' in file names (the built-in robust-kd:clean has
    one); it becomes '@', which entry names cannot hold, so no two entries share a file."""
    return out / "models" / f"{variant.replace(':', '@')}-seed{seed}.pt"


def study_config(entry, settings, common, teacher_path):
    """The trainer options of a study entry (method, options): the demo's student of its method (`common`: the
    options every model shares, seed included), with the entry's options."""
    method, options = entry
    options = dict(options)
    for name in [n for n in options if n.endswith("_eps")]:
        options[name[:-len("_eps")]] = options.pop(name) * common["eps"]
    return {**training_config(method, settings, common, teacher_path), **options}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows, variants, known):
    """Per variant: n, and mean and sample standard deviation of each figure, in the order of `variants`
    (`known`: variant -> (method, options))."""
    summary = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        entry = {"method": known[variant][0], "n": len(mine)}
        for figure in FIGURES:
            entry[f"{figure}_mean"], entry[f"{figure}_std"] = _mean_std([r.get(figure) for r in mine])
        entry["masking_flags"] = sum(bool(r["masking"]) for r in mine)
        summary[variant] = entry
    return summary


def criterion(summary):
    """The study's question, answered from the means: robust-kd against the best single-step baseline, fgsm-rs's
    time and every other method."""
    single = [v for v in SINGLE_STEP if v in summary]
    if "robust-kd" not in summary or "fgsm-rs" not in summary:
        return {"evaluated": False, "reason": "robust-kd and fgsm-rs must both be in the study"}
    mine, fgsm = summary["robust-kd"], summary["fgsm-rs"]
    best = max(single, key=lambda v: summary[v]["autoattack_mean"])
    ratio = mine["train_seconds_mean"] / fgsm["train_seconds_mean"]
    dominated_by = [v for v, s in summary.items() if v != "robust-kd"
                    and s["autoattack_mean"] > mine["autoattack_mean"]
                    and s["train_seconds_mean"] < mine["train_seconds_mean"]]
    margin = mine["autoattack_mean"] - summary[best]["autoattack_mean"]
    clears = margin >= MARGIN - 1e-12  # a margin of exactly MARGIN counts, whatever the rounding
    result = {"evaluated": True, "robust_kd_autoattack": mine["autoattack_mean"],
              "best_single_step": best, "best_single_step_autoattack": summary[best]["autoattack_mean"],
              "margin": margin, f"margin_at_least_{MARGIN}": clears,
              "fgsm_rs_autoattack": fgsm["autoattack_mean"], "time_ratio_to_fgsm_rs": ratio,
              f"time_at_most_{TIME_RATIO}x_fgsm_rs": ratio <= TIME_RATIO, "dominated_by": dominated_by}
    result["met"] = clears and ratio <= TIME_RATIO and not dominated_by
    return result


def _evaluate_job(job):
    """One model's evaluation, in a worker process: clean and PGD-20 on the test split, AutoAttack standard on
    it (or the subset), the transfer examples' accuracy; writes the transfer examples when asked. A job that
    brings its `scores` only writes the transfer examples."""
    from .attacks import pgd
    from .attacks.sanity import collect_cautions
    from .model_file import load_model
    from .studies import evaluate_model

    torch.set_num_threads(job["threads"])
    model = load_model(job["path"])
    x, y = torch.load(job["test"], weights_only=True)
    aa = job["aa_index"]
    scores = job.get("scores")
    if scores is None:
        with collect_cautions() as cautions:
            row = evaluate_model(model, (x, y), (x[aa], y[aa]), job["eps"], job["seed"], attacks=("clean", "pgd20"),
                                 autoattack=job["autoattack"])
        scores = {**row, "warnings": cautions}
    if job.get("write_transfer"):
        x_adv = pgd(model, x, y, job["eps"], job["eps"] / 4, 20, random_start=True, seed=job["seed"])
        torch.save(x_adv, job["write_transfer"])
    return job["key"], scores


def _transfer_accuracy(path, x_adv, y):
    from .model_file import load_model

    model = load_model(path)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


class _Finished:
    """The models and scores a resumed study keeps: each must come from this commit (and a clean tree) and, for a
    model, the same trainer options; anything else is a ValueError."""

    def __init__(self, resume, provenance):
        self.resume = resume
        self.commit = {"git_commit": provenance.get("git_commit"), "git_dirty": provenance.get("git_dirty")}

    def _check_commit(self, path, held):
        if {k: held.get(k) for k in self.commit} != self.commit:
            raise ValueError(f"--resume: {path} comes from commit {held.get('git_commit')} (dirty: "
                             f"{held.get('git_dirty')}), this is {self.commit['git_commit']} (dirty: "
                             f"{self.commit['git_dirty']}): a study runs from one commit; check it out or start "
                             "another --out")

    def model(self, path, cfg):
        """The meta of the model file `path` trained with options `cfg`, or None when it must be trained."""
        from .model_file import load_model
        from .models import model_info

        if not (self.resume and path.is_file()):
            return None
        meta = model_info(load_model(path))["meta"]
        self._check_commit(path, meta)
        if meta.get("study_config") != plain(cfg):
            raise ValueError(f"--resume: {path} was trained with other options than this study's: the same "
                             "settings, or another --out")
        return meta

    def scores(self, path):
        """The scores saved in `path`, or None when the model must be evaluated."""
        import json

        if not (self.resume and path.is_file()):
            return None
        held = json.loads(path.read_text())
        self._check_commit(path, held)
        return held["scores"]


@holding_lock  # one process per --out
def run_frontier(out, *, dataset="digits", data_dir=None, variants=None, custom=None, seeds=None, eps=None, jobs=2,
                 threads=1, quick=False, autoattack_samples=None, teacher=None, device="cpu", resume=False,
                 overwrite=False, progress=True, command=None):
    """The study as a function; returns the results dict (also written to out/results.json). `custom`: entries of
    the caller's own, name -> (method, {option: value}) (`parse_variant`), run after `variants`."""
    from .atomic import atomic_write, atomic_write_json
    from .model_file import load_model, save_model
    from .plots import plot_frontier
    from .studies import check_teacher, common_options, settings as study_settings, test_split
    from .train import train_model
    from .train.methods import default_study_variants, study_variants
    from .bench.report import machine_info
    from .models import model_info
    from .provenance import provenance

    out = Path(out)
    known = study_variants()
    custom = dict(custom or {})
    clash = sorted(set(custom) & set(known))
    if clash:
        raise ValueError(f"--variant {', '.join(clash)}: the study already has an entry of that name")
    variants = default_study_variants() if variants is None else tuple(variants)
    unknown = [v for v in variants if v not in known]
    variants += tuple(custom)
    known.update(custom)
    if unknown or not variants:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--methods lists a method twice: {', '.join(variants)}")
    settings = study_settings(dataset, "frontier", quick)
    seeds = settings["seeds"] if seeds is None else seeds
    for name, value in (("--seeds", seeds), ("--jobs", jobs), ("--threads", threads)):
        check_int(name, value)
    eps = check_eps(settings["eps"] if eps is None else eps, "--eps")
    if check_samples("--autoattack-samples", autoattack_samples) is not None:
        settings["autoattack_samples"] = autoattack_samples
    if teacher is not None:
        check_teacher(teacher, dataset)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    files = RunFiles(out)
    files.names()  # a record that names anything outside the study's own files is refused before anything runs
    if files.exists() and not (overwrite or resume):
        raise ValueError(f"--out {out} holds another study; pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --out")
    if resume and not files.exists():
        raise ValueError(f"--resume: --out {out} holds no study to continue")
    # The data are read (and checked) before anything is written.
    x, y, aa_index = test_split(dataset, settings["test_samples"], settings["autoattack_samples"], data_dir)
    if files.exists() and overwrite:
        files.remove_all()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()  # the load average before the study starts
    record = provenance()
    finished = _Finished(resume, record)
    stamp = {"git_commit": record.get("git_commit"), "git_dirty": record.get("git_dirty")}

    test_file = files.add(out / "models" / "test.pt")
    files.written(atomic_write(test_file, lambda f: torch.save((x, y), f)))

    stages = Stages(progress, prefix="frontier")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        teacher_path = Path(teacher) if teacher is not None else files.add(out / "models" / "teacher.pt")
        if teacher is None:
            cfg = training_config("teacher", settings, common_options(dataset, settings, eps=eps, seed=0,
                                                                      device=device, data_dir=data_dir), None)
            if finished.model(teacher_path, cfg) is None:
                result = stages.run("train teacher", lambda: train_model(cfg))
                files.written(save_model(result.model, teacher_path, name="teacher", method="pgd-at",
                                         eps=float(eps), train_seconds=result.train_seconds,
                                         study_config=plain(cfg), **stamp))
        rows = []
        for seed in range(seeds):
            for variant in variants:
                common = common_options(dataset, settings, eps=eps, seed=seed, device=device, data_dir=data_dir)
                cfg = study_config(known[variant], settings, common, teacher_path)
                path = files.add(model_path(out, variant, seed))
                meta = finished.model(path, cfg)
                if meta is None:
                    result = stages.run(f"train {variant} seed {seed}", lambda cfg=cfg: train_model(cfg))
                    files.written(save_model(result.model, path, name=variant, method=cfg["method"], seed=seed,
                                             eps=float(eps), train_seconds=result.train_seconds,
                                             study_config=plain(cfg), **stamp))
                    meta = {"train_seconds": result.train_seconds}
                    path.with_suffix(".json").unlink(missing_ok=True)  # scores of another model
                rows.append({"variant": variant, "method": cfg["method"], "seed": seed,
                             "train_seconds": meta["train_seconds"], "path": str(path)})
    finally:
        torch.set_num_threads(saved_threads)

    # Evaluation: every model not yet evaluated in a worker, its scores saved beside it as they come (the
    # teacher's in models/teacher.json); the transfer source (the seed's PGD-AT student, else the teacher) writes
    # its PGD-20 examples of the test split.
    teacher_row = {"variant": "teacher", "method": "pgd-at", "seed": 0, "path": str(teacher_path),
                   "train_seconds": model_info(load_model(teacher_path))["meta"].get("train_seconds")}
    evaluated = [*rows, teacher_row]
    use_teacher = TRANSFER_SOURCE not in variants

    def scores_file(row):
        return out / "models" / "teacher.json" if row is teacher_row else Path(row["path"]).with_suffix(".json")

    def transfer_file(seed):
        return out / "models" / ("transfer-teacher.pt" if use_teacher else f"transfer-seed{seed}.pt")

    def is_source(row):
        return row["variant"] == ("teacher" if use_teacher else TRANSFER_SOURCE)

    evaluation_threads = max(1, threads // jobs)
    jobs_list = []
    for i, row in enumerate(evaluated):
        held = finished.scores(files.add(scores_file(row)))
        if held is not None and (not is_source(row) or transfer_file(row["seed"]).is_file()):
            row.update(held)
            continue
        job = {"key": i, "path": row["path"], "test": str(test_file), "aa_index": aa_index, "eps": float(eps),
               "seed": row["seed"], "threads": evaluation_threads, "autoattack": settings["autoattack"]}
        if held is not None:  # a source whose transfer examples are missing (a copied study leaves them out)
            job["scores"] = held
        if is_source(row):
            job["write_transfer"] = str(files.add(transfer_file(row["seed"])))
        jobs_list.append(job)
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for job, (key, scores) in zip(jobs_list, pool.map(_evaluate_job, jobs_list)):
            r = evaluated[key]
            r.update(scores)
            files.written(atomic_write_json(scores_file(r), {"scores": scores, **stamp}))
            if progress:
                done = "kept the scores and wrote the transfer examples of" if "scores" in job else "evaluated"
                print(f"[frontier] {done} {r['variant']} seed {r['seed']}: clean {r['clean']:.3f} "
                      f"PGD-20 {r['pgd20']:.3f} AA {r['autoattack']:.3f}", flush=True)
                for caution in r["warnings"]:
                    print(f"[frontier] warning ({r['variant']} seed {r['seed']}): {caution}", flush=True)
    evaluation_seconds = time.perf_counter() - t
    files.written(*[job["write_transfer"] for job in jobs_list if "write_transfer" in job])
    for row in evaluated:
        source = transfer_file(row["seed"])
        row["transfer"] = None
        if not is_source(row) and source.is_file():
            row["transfer"] = _transfer_accuracy(row["path"], torch.load(source, weights_only=True), y)
        row["masking"] = row["autoattack"] < row["pgd20"] - MASKING_GAP
        if Path(row["path"]).is_relative_to(out):  # a --teacher file elsewhere keeps its own path
            row["path"] = str(Path(row["path"]).relative_to(out))

    summary = summarize(rows, variants, known)
    results = {
        "dataset": dataset, "eps": float(eps), "norm": "linf", "settings": settings, "seeds": seeds,
        "variants": list(variants), "options": {v: known[v][1] for v in variants}, "threads": threads, "jobs": jobs,
        "evaluation_threads": evaluation_threads,
        "device": device, "test_samples": len(y), "autoattack_samples": len(aa_index),
        "autoattack_version": settings["autoattack"],
        "transfer_source": "teacher" if use_teacher else TRANSFER_SOURCE, "masking_gap": MASKING_GAP,
        "teacher": teacher_row, "rows": rows, "summary": summary, "criterion": criterion(summary),
        "stages": stages.records, "evaluation_seconds": round(evaluation_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine, "load_average_at_end": machine_info()["load_average_1_5_15"]},
        "command": list(command) if command else ["rkd-fast", "frontier", "--dataset", dataset, "--out", str(out)],
        "quick": bool(quick), "resumed": bool(resume), **record,
    }
    files.written(
        _write_csv(files.add(out / "seeds.csv"), rows, ["variant", "method", "seed", *FIGURES, "masking", "warnings",
                                                          "path"]),
        _write_csv(files.add(out / "summary.csv"), [{"variant": v, **s} for v, s in summary.items()],
                   ["variant", "method", "n", *[f"{f}_{k}" for f in FIGURES for k in ("mean", "std")],
                    "masking_flags"]),
        atomic_write_json(files.add(out / "results.json"), results))
    figure = files.add(out / "frontier.png")
    plot_frontier([{"method": v, "aa_mean": s["autoattack_mean"], "aa_std": s["autoattack_std"],
                    "seconds_mean": s["train_seconds_mean"], "seconds_std": s["train_seconds_std"]}
                   for v, s in summary.items()], figure,
                  title=f"{dataset}, {seeds} seeds: AutoAttack accuracy vs training cost")
    files.written(figure)
    return results


def _write_csv(path, rows, columns):
    from .atomic import atomic_write

    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: " | ".join(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
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
    teacher = results.get("teacher")
    if teacher:
        seconds = "—" if teacher["train_seconds"] is None else f"{teacher['train_seconds']:.0f}"
        lines.append(f"{'(teacher)':<16} {100 * teacher['clean']:>12.1f} {100 * teacher['pgd20']:>12.1f} "
                     f"{100 * teacher['autoattack']:>12.1f} {'':>12} {seconds:>13}")
    c = results["criterion"]
    source = ("the teacher" if results["transfer_source"] == "teacher"
              else f"the {results['transfer_source']} student of the same seed")
    lines.append(f"{results['seeds']} seeds; L∞ eps {results['eps']}; clean/PGD-20 on {results['test_samples']} test "
                 f"samples, AutoAttack ({results['autoattack_version']}) on {results['autoattack_samples']}; "
                 f"transfer: PGD-20 examples of {source}")
    if c.get("evaluated"):
        lines.append(f"criterion {'met' if c['met'] else 'NOT met'}: robust-kd AA {100 * c['robust_kd_autoattack']:.1f} "
                     f"vs the best single-step ({c['best_single_step']}) {100 * c['best_single_step_autoattack']:.1f} "
                     f"(margin {100 * c['margin']:+.1f}, wanted ≥ {100 * MARGIN:+.0f}), time "
                     f"{c['time_ratio_to_fgsm_rs']:.2f}× fgsm-rs (≤ {TIME_RATIO}), dominated by: "
                     f"{', '.join(c['dominated_by']) or 'none'}")
    return "\n".join(lines)


def run(args):
    from .cli import invoked_command

    command = invoked_command("frontier")
    variants = tuple(v.strip() for v in args.methods.split(",") if v.strip())
    try:
        custom = {}
        for text in args.variant:
            name, entry = parse_variant(text)
            if name in custom:
                raise ValueError(f"--variant {name} is given twice")
            custom[name] = entry
        results = run_frontier(args.out, dataset=args.dataset, data_dir=args.data_dir, variants=variants, custom=custom,
                               seeds=args.seeds, eps=args.eps, jobs=args.jobs, threads=args.threads, quick=args.quick,
                               autoattack_samples=args.autoattack_samples, teacher=args.teacher, device=args.device,
                               resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                               command=command)
    except (TypeError, ValueError, FileNotFoundError) as error:
        print(f"rkd-fast frontier: error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"total: {results['total_seconds']:.0f} s (evaluation {results['evaluation_seconds']:.0f} s in "
          f"{results['jobs']} processes); wrote {args.out}/results.json, seeds.csv, summary.csv, frontier.png")
    return 0
