"""The Fashion-MNIST frontier from its records: every method's five seeds (the studies of 86901a7 and dc2627f) beside
its training cost timed side by side (timing-3885936, run C). Prints the table of docs/frontier.md and the README
and draws frontier.png (AutoAttack accuracy against the cost). From the repository root:

    python docs/frontier/fashion-mnist/frontier_table.py
"""

import csv
from pathlib import Path

from rkd_fast.plots import plot_frontier

HERE = Path(__file__).resolve().parent
# (label, record folder, variant in that study, entry of timing run C); a folder of None: timed, not studied
METHODS = [
    ("natural", "study-dc2627f", "natural", "natural"),
    ("kd", "study-dc2627f", "kd", "kd"),
    ("fgsm-rs", "run-86901a7", "fgsm-rs", "fgsm-rs"),
    ("n-fgsm", "run-86901a7", "n-fgsm", "n-fgsm"),
    ("robust-kd, digits' defaults", "run-86901a7", "robust-kd", None),
    ("**robust-kd, Fashion-MNIST's default**", "study-dc2627f", "rkd-tclean-kd-only", "robust-kd"),
    ("… the same students without the teacher cache", "study-dc2627f", "rkd-tclean-kd-only", "robust-kd-no-cache"),
    ("pgd-2", "study-dc2627f", "pgd-2", "pgd-2"),
    ("pgd-at (PGD-10)", "study-dc2627f", "pgd-at-10", "pgd-at-10"),
    ("trades", "trades-dc2627f", "trades", "trades"),
]
STUDY_EPOCHS = 6


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def study_seconds(row):
    """Seconds of the study's six epochs from run C's timed epochs: the first (with any one-off pass, as the
    teacher cache's) and the second repeated for the rest; a method timed for one epoch repeats it."""
    first, second = float(row["epoch1_s"]), row["epoch2_s"]
    later = float(second) if second else first
    return first + (STUDY_EPOCHS - 1) * later


def main():
    summaries = {folder: {r["variant"]: r for r in read_csv(HERE / folder / "summary.csv")}
                 for folder in {m[1] for m in METHODS} if folder}
    timed = {r["entry"]: r for r in read_csv(HERE / "timing-3885936" / "epochs.csv") if r["run"] == "C"}
    fgsm_rs = study_seconds(timed["fgsm-rs"])
    print("| method | seeds | clean | PGD-20 | AutoAttack | transfer | × fgsm-rs (6 epochs, timed side by side) |")
    print("|---|---|---|---|---|---|---|")
    points = []
    for label, folder, variant, entry in METHODS:
        ratio = study_seconds(timed[entry]) / fgsm_rs if entry else None
        cost = "—" if ratio is None else f"{ratio:.2f}"
        if folder is None:
            print(f"| {label} | 0 | not run | | | | {cost} |")
            continue
        s = summaries[folder][variant]
        cells = [f"{100 * float(s[f + '_mean']):.1f} ± {100 * float(s[f + '_std']):.1f}"
                 for f in ("clean", "pgd20", "autoattack", "transfer")]
        print(f"| {label} | {s['n']} | {' | '.join(cells)} | {cost} |")
        if ratio is not None and "without the teacher cache" not in label:
            points.append({"method": label.strip("*"), "aa_mean": float(s["autoattack_mean"]),
                           "aa_std": float(s["autoattack_std"]), "seconds_mean": ratio, "seconds_std": 0.0})
    plot_frontier(points, HERE / "frontier.png", title="Fashion-MNIST, 5 seeds: AutoAttack accuracy vs training cost",
                  xlabel="training time, × fgsm-rs's (timed side by side)")


if __name__ == "__main__":
    main()
