"""`rkd-fast demo`: the whole recipe on the embedded digits data, on CPU, in a few minutes.

Trains a robust teacher (PGD-AT), then four students of one smaller architecture: natural, kd, robust-kd, and a
PGD-AT student (the cost baseline robust-kd competes with); --all adds the baselines trades, ard and rslad (same
student architecture, width, epochs and schedule; ard and rslad distil the same teacher). Evaluates every model on
the test split (clean, FGSM, PGD-20 and AutoAttack standard, L∞ radius --eps), prints a table, and writes into --out:

    results.json              accuracies, training seconds, per-stage wall and CPU seconds, config, versions
    robustness_vs_cost.png    robust accuracy (PGD-20 and AutoAttack) against each model's training seconds
    models/NAME.pt            every model (rkd_fast.save_model), so `rkd-fast eval` can re-check it

``train_seconds`` of a model is its own training time (the trainer's clock: optimizer steps only); the
students' figures do not include the teacher's. The settings below are those docs/demo_tuning.md measured.
"""

import sys
import time
from pathlib import Path

import torch

from .dirlock import holding_lock
from .runfiles import RunFiles

# The models trained, in order (the teacher first: the distilling students load it). A student's name is its method.
MODEL_NAMES = ("teacher", "natural", "kd", "robust-kd", "pgd-at")
BASELINE_NAMES = ("fgsm-rs", "n-fgsm", "free-at", "trades", "ard", "rslad")  # added by --all (docs/baselines.md)
# free-at's m: 5 replays over 10 / 5 = 2 epochs are the other students' 100 optimizer steps (its default m is 8)
FREE_AT_DEMO_REPLAYS = 5

# Full demo and --quick (the test's smoke run). AutoAttack standard dominates the run time (its Square attack
# makes 5,000 queries per still-robust sample), so it runs on a fixed class-stratified subset of the test split.
SETTINGS = {
    "full": {"teacher_width": 16, "student_width": 8, "teacher_epochs": 10, "student_epochs": 10,
             "test_samples": None, "autoattack_samples": 200},
    "quick": {"teacher_width": 8, "student_width": 8, "teacher_epochs": 2, "student_epochs": 2,
              "test_samples": 40, "autoattack_samples": 10},
}
# Options shared by every training run of the demo (the rest are the trainer's defaults, robust-kd's included).
COMMON = {"dataset": "digits", "arch": "small_cnn", "batch_size": 128, "device": "cpu", "progress": False}


def add_arguments(parser):
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=0.1,
                        help="L∞ radius on the [0, 1] pixel scale, for PGD-AT training and every attack "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs, a test subset (for tests; the numbers mean little)")
    parser.add_argument("--autoattack-samples", type=int, default=None, metavar="N",
                        help="AutoAttack on a fixed class-stratified subset of N test samples "
                             f"(default: {SETTINGS['full']['autoattack_samples']}; 0 or more than the split: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these models are too small for two threads "
                             "to help, and on a busy machine they slow down; see docs/demo_tuning.md)")
    parser.add_argument("--all", action="store_true",
                        help="also train and evaluate the baseline students " + ", ".join(BASELINE_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the demo results already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no per-stage progress lines")


def model_names(all_baselines=False):
    """The models a run trains, in order; --all appends the baselines."""
    return MODEL_NAMES + (BASELINE_NAMES if all_baselines else ())


def training_config(name, settings, common, teacher_path):
    """The trainer config of model `name`: the teacher is PGD-AT at the teacher's width; a student is trained with
    the method of its name at the student width, given the teacher file when its method distils one. free-at
    replays each batch FREE_AT_DEMO_REPLAYS times over the epochs divided by that: the same optimizer steps."""
    from .train.methods import METHODS

    if name == "teacher":
        cfg = {**common, "method": "pgd-at", "width": settings["teacher_width"],
               "epochs": settings["teacher_epochs"]}
    else:
        cfg = {**common, "method": name, "width": settings["student_width"], "epochs": settings["student_epochs"]}
        if METHODS[name].needs_teacher:
            cfg["teacher"] = str(teacher_path)
        if name == "free-at":
            cfg.update(free_replays=FREE_AT_DEMO_REPLAYS, epochs=max(1, cfg["epochs"] // FREE_AT_DEMO_REPLAYS))
    cfg["eval_every"] = cfg["epochs"]  # the trainer's robust validation once, at the end
    return cfg


def check_out(out, overwrite):
    """Refuses an --out holding another demo's results unless --overwrite, and then removes exactly the files that
    demo wrote (its record, rkd_fast.runfiles). Other files in --out, models/ included, are never touched."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    files = RunFiles(out)
    files.names()  # a record that names anything outside the demo's own files is refused before anything runs
    if not files.exists():
        return
    if not overwrite:
        raise ValueError(f"--out {out} holds another demo's results; pass --overwrite to replace them or choose "
                         "another --out")
    files.remove_all()


class Stages:
    """Wall and process-CPU seconds of each stage (the machine may be shared: CPU time is the steadier one)."""

    def __init__(self, show, prefix="demo"):
        self.show, self.prefix = show, prefix
        self.records = {}

    def run(self, name, function):
        if self.show:
            print(f"[{self.prefix}] {name} ...", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        value = function()
        record = {"wall_seconds": round(time.perf_counter() - wall, 3),
                  "cpu_seconds": round(time.process_time() - cpu, 3)}
        self.records[name] = record
        if self.show:
            print(f"[{self.prefix}] {name}: {record['wall_seconds']:.1f} s wall, {record['cpu_seconds']:.1f} s CPU",
                  flush=True)
        return value


def _evaluate(model, test, aa, eps, seed):
    from .attacks import evaluate

    scores = evaluate(model, test, attacks=["clean", "fgsm", "pgd20"], eps=eps, seed=seed)
    scores_aa = evaluate(model, aa, attacks=["autoattack"], eps=eps, seed=seed, sanity_checks=False)
    return {"clean": scores["clean"], "fgsm": scores["fgsm"], "pgd20": scores["pgd20"],
            "autoattack": scores_aa["autoattack"]}


def format_table(results):
    header = f"{'model':<10} {'clean':>7} {'FGSM':>7} {'PGD-20':>7} {'AA':>7} {'train s':>8} {'vs pgd-at':>9}"
    lines = [header, "-" * len(header)]
    base = results["models"]["pgd-at"]["train_seconds"]
    for name, r in results["models"].items():
        lines.append(f"{name:<10} {r['clean']:7.1%} {r['fgsm']:7.1%} {r['pgd20']:7.1%} {r['autoattack']:7.1%} "
                     f"{r['train_seconds']:8.2f} {r['train_seconds'] / base:8.2f}×")
    lines.append(f"L∞ eps = {results['eps']}; clean/FGSM/PGD-20 on {results['test_samples']} test samples, "
                 f"AutoAttack (standard) on {results['autoattack_samples']}")
    return "\n".join(lines)


def plot(results, path):
    from .plots import plot_robustness_vs_cost

    return plot_robustness_vs_cost(results["models"], path, eps=results["eps"],
                                   xlabel="training seconds (own training only, log scale)")


@holding_lock  # one process per --out
def run_demo(out, *, eps=0.1, quick=False, all_baselines=False, autoattack_samples=None, threads=1, seed=0,
             overwrite=False, progress=True, command=None):
    """The demo as a function; returns the results dict (also written to out/results.json)."""
    from .atomic import atomic_write_json
    from .datasets import load_digits, stratified_subset
    from .model_file import save_model
    from .train import train_model
    from .info import provenance

    out = Path(out)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    settings = dict(SETTINGS["quick" if quick else "full"])
    if autoattack_samples is not None:
        if autoattack_samples < 0:
            raise ValueError(f"autoattack_samples must be >= 0, got {autoattack_samples}")
        settings["autoattack_samples"] = autoattack_samples
    check_out(out, overwrite)
    (out / "models").mkdir(parents=True, exist_ok=True)
    files = RunFiles(out)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = load_digits("test")
        if settings["test_samples"]:
            keep = stratified_subset(y, settings["test_samples"])
            x, y = x[keep], y[keep]
        aa_index = stratified_subset(y, settings["autoattack_samples"])
        test, aa = (x, y), (x[aa_index], y[aa_index])

        stages = Stages(progress)
        common = {**COMMON, "eps": float(eps), "seed": seed}
        names = model_names(all_baselines)
        configs, models, train_seconds = {}, {}, {}
        for name in names:
            cfg = training_config(name, settings, common, out / "models" / "teacher.pt")
            result = stages.run(f"train {name}", lambda cfg=cfg: train_model(cfg))
            models[name], train_seconds[name] = result.model, result.train_seconds
            configs[name] = result.config.to_dict()
            files.written(save_model(result.model, files.add(out / "models" / f"{name}.pt"), name=name,
                                     method=cfg["method"], eps=float(eps), train_seconds=result.train_seconds,
                                     config=_plain(configs[name])))

        scores = {}
        for name in names:
            scores[name] = stages.run(f"evaluate {name}", lambda name=name: _evaluate(models[name], test, aa, eps,
                                                                                     seed))
    finally:
        torch.set_num_threads(saved_threads)

    results = {
        "eps": float(eps),
        "norm": "linf",
        "models": {name: {**scores[name], "train_seconds": train_seconds[name]} for name in names},
        "test_samples": len(test[1]),
        "autoattack_samples": len(aa[1]),
        "autoattack_subset": "all test samples" if len(aa[1]) == len(test[1]) else
        "class-stratified: the first samples of each class in turn (rkd_fast.datasets.stratified_subset)",
        "autoattack_version": "standard",
        "quick": bool(quick),
        "settings": settings,
        "threads": threads,
        "stages": stages.records,
        "total_wall_seconds": round(sum(r["wall_seconds"] for r in stages.records.values()), 3),
        "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in stages.records.values()), 3),
        "configs": configs,
        "command": list(command) if command else ["rkd-fast", "demo", "--out", str(out), "--eps", str(eps)]
        + (["--quick"] if quick else []) + (["--all"] if all_baselines else []),
        **provenance(),
    }
    figure = files.add(out / "robustness_vs_cost.png")
    plot(results, figure)
    files.written(atomic_write_json(files.add(out / "results.json"), results), figure)
    return results


def _plain(value):
    # save_model's meta must be plain containers: tuples become lists, anything else odd a string.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (str, bool, int, float):
        return value
    return str(value)


def run(args):
    from .cli import invoked_command

    command = invoked_command("demo")
    try:
        results = run_demo(args.out, eps=args.eps, quick=args.quick, all_baselines=args.all,
                           autoattack_samples=args.autoattack_samples, threads=args.threads, seed=args.seed,
                           overwrite=args.overwrite, progress=not args.no_progress, command=command)
    except (TypeError, ValueError) as error:
        print(f"rkd-fast demo: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"total: {results['total_wall_seconds']:.1f} s wall, {results['total_cpu_seconds']:.1f} s CPU; "
          f"wrote {args.out / 'results.json'}, {args.out / 'robustness_vs_cost.png'}, {args.out / 'models'}/")
    return 0
