"""The picture: test accuracy against GFLOPs per image (as executed) of every seed's networks: the unpruned
network and plain dense training, static only, static + dynamic (per-image routes), and the two baselines
at equal GFLOPs (the best fixed route, static pruning pushed further). A larger marker is the mean of a kind.

    python -m evaluation.plot [evaluation/results/study_points.json] [evaluation/results/study.png]

Reads the points evaluation/study.py wrote.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STYLE = {  # kind -> (marker, colour)
    "w/o pruning (row 1)": ("*", "crimson"), "plain dense training": ("P", "grey"),
    "static only": ("^", "tab:blue"), "static + dynamic (per-image routes)": ("o", "tab:green"),
    "static only, pushed to equal GFLOPs": ("v", "tab:purple"),
    "best fixed route (stage-3 weights, under budget)": ("s", "darkorange"),
    "best fixed route (stage-3 weights, over budget)": ("s", "gold"),
    "best fixed route (stage-2 weights, under budget)": ("D", "saddlebrown"),
    "best fixed route (stage-2 weights, over budget)": ("D", "tan"),
}


def plot_points(points, path, band=5.0):
    """Left: every point. Right: the same points, the accuracy axis zoomed onto the kinds whose mean lies
    within `band` points of the best mean (where the comparison is decided; far-off kinds such as fixed
    routes on untrained weights squash it on the left)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), dpi=120)
    kinds = [k for k in STYLE if any(p["kind"] == k for p in points)] + \
        sorted({p["kind"] for p in points} - set(STYLE))
    means = {}
    for kind in kinds:
        mine = [p for p in points if p["kind"] == kind]
        xs, ys = [p["gflops_per_image"] for p in mine], [p["test_acc"] for p in mine]
        means[kind] = (sum(ys) / len(ys), ys)
        marker, color = STYLE.get(kind, ("x", "black"))
        for ax in axes:
            ax.plot(xs, ys, marker, color=color, ms=5, alpha=0.45, ls="none")
            ax.plot(sum(xs) / len(xs), sum(ys) / len(ys), marker, color=color, ms=11, mec="black", ls="none",
                    label=f"{kind} ({len(mine)} seed{'s' * (len(mine) > 1)})" if ax is axes[0] else None)
    if means:  # a study with nothing done yet draws empty axes
        best = max(m for m, _ in means.values())
        near = [y for m, ys in means.values() if m >= best - band for y in ys]
        axes[1].set_ylim(min(near) - 0.5, max(near) + 0.5)
    for ax, title in zip(axes, ("all networks", f"zoomed: kinds within {band:g} points of the best mean")):
        ax.set_xlabel("GFLOPs per image (as executed)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs. compute: small markers are seeds, large ones their mean", fontsize=11)
    fig.legend(fontsize=7, loc="lower center", ncol=3, framealpha=0.8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(RESULTS, "study_points.json")
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(RESULTS, "study.png")
    with open(src) as f:
        plot_points(json.load(f)["points"], dst)
    print(f"-> {dst}")


if __name__ == "__main__":
    main()
