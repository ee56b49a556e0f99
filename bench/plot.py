"""The picture: test accuracy against GFLOPs per image, one line per compression level through its alpha
sweep (static + dynamic), the static-only point of each level, the unpruned network and Torch-Pruning.

    python bench/plot.py [bench/results/study_points.json] [bench/results/study.png]

Reads the points bench/study.py wrote (each one names the metrics.json of the run it comes from).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PEER_MARKERS = {"torch-pruning magnitude": "s", "torch-pruning taylor": "D"}


def plot_points(points, path):
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    levels = sorted({p["compression_target"] for p in points if "compression_target" in p})
    colors = plt.get_cmap("viridis")([0.15 + 0.7 * i / max(1, len(levels) - 1) for i in range(len(levels))])
    for level, color in zip(levels, colors):
        static = [p for p in points if p["kind"] == "static" and p["compression_target"] == level]
        dynamic = sorted((p for p in points if p["kind"] == "static+dynamic" and p["compression_target"] == level),
                         key=lambda p: p["alpha"])
        ax.plot([p["gflops_per_image"] for p in dynamic], [p["test_acc"] for p in dynamic], "o-", color=color,
                ms=5, label=f"static + dynamic, {100 * level:.0f}% params removed (alpha sweep)")
        for p in dynamic:
            ax.annotate(f"{p['alpha']:g}", (p["gflops_per_image"], p["test_acc"]), textcoords="offset points",
                        xytext=(3, 4), fontsize=7, color=color)
        ax.plot([p["gflops_per_image"] for p in static], [p["test_acc"] for p in static], "^", color=color,
                ms=9, mec="black", label=f"static only, {100 * level:.0f}%")
    for p in points:
        if p["kind"] == "unpruned":
            ax.plot(p["gflops_per_image"], p["test_acc"], "*", color="crimson", ms=14, mec="black",
                    label="w/o pruning")
        elif p["kind"] in PEER_MARKERS:
            ax.plot(p["gflops_per_image"], p["test_acc"], PEER_MARKERS[p["kind"]], color="darkorange", ms=8,
                    mec="black", label=f"{p['kind'].replace('torch-pruning', 'Torch-Pruning')}, "
                                       f"{100 * p['compression']:.0f}%")
    ax.set_xlabel("GFLOPs per image (as executed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs. compute (numbers at points: alpha)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
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
