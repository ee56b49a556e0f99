"""The whole pipeline in one command, small enough for a laptop CPU (a few minutes on 2 cores):

    python demo.py [--result_dir DIR] [--data_dir DIR] [--keep]

1. writes a small learnable dataset (utils/synthetic.py) in CIFAR's PNG class-folder layout,
2. runs the three stage scripts exactly as a user would, as subprocesses:
     main_sp.py        ResNet-20 (width 1) with switches, trained from scratch     -> row "w/o pruning"
     main_prune.py     K-FAC eigenbasis pruning to 60% compression + fine-tuning   -> "static pruning only"
     main_rl_prune.py  switches learn to skip blocks per image (counterfactual)    -> "static + dynamic"
3. prints the table that main_rl_prune.py wrote to <result_dir>/table.md.

Its sizes (the demo's, not the paper's) and what its numbers show on any machine: README.md, "Try it".
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from utils.files import read_json, write_json
from utils.synthetic import write_synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = dict(num_classes=10, train_per_class=100, test_per_class=40, size=16)
COMMON = ["--img_type", "png", "--resize", str(DATA["size"]), "--num_workers", "2", "--device", "cpu"]
STAGE1 = ["--network", "resnet", "--depth", "20", "--width", "1", "--epochs", "15", "--dense_epochs", "10",
          "--lr", "0.1", "--bs", "64", "--momentum", "0.9", "--weight_decay", "0.0005"]
STAGE2 = {"compression": 0.6, "epochs": 6, "lr": 0.02, "bs": 64, "fisher_batches": 16, "seed": 0, "criterion": "score",
          "round_to": 1}  # EigenDamage's ranking and free ranks: this small network is about accuracy, not speed
STAGE3 = ["--network", "resnet", "--depth", "20", "--epochs", "15", "--lr", "0.05", "--bs", "64", "--momentum", "0.9",
          "--weight_decay", "0.0005", "--alpha", "1.0", "--gamma", "1", "--rl_weight", "0.01"]


def run(script, *argv):
    """One stage, as a user runs it; its output streams through, a failure stops the demo."""
    t0 = time.time()
    print(f"\n$ python {script} {' '.join(argv)}", flush=True)
    # one thread unless set: convolutions this small gain little from a second, and lose much on shared cores
    proc = subprocess.run([sys.executable, script, *argv], cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode:
        sys.exit(f"demo: {script} failed with exit status {proc.returncode}")
    return time.time() - t0


def conclusion(table_json):
    """What the table shows, in words that stay true whatever the machine: GFLOPs are counted, not timed;
    accuracy differences are given with the size of one test image."""
    rows = {r["stage"]: r for r in read_json(table_json)["rows"]}
    dense, static, dynamic = rows["sp"], rows["prune"], rows["rl"]
    images = DATA["num_classes"] * DATA["test_per_class"]
    saved = 1 - dynamic["gflops_per_image"] / static["gflops_per_image"]
    return (f"static pruning removes {100 * static['compression']:.0f}% of the parameters and "
            f"{100 * (1 - static['gflops_per_image'] / dense['gflops_per_image']):.0f}% of the GFLOPs; the switches "
            f"cut {100 * saved:.0f}% of the remaining GFLOPs per image. Accuracy: "
            f"{static['accuracy'] - dense['accuracy']:+.2f} and {dynamic['accuracy'] - dense['accuracy']:+.2f} points "
            f"against the unpruned network, on {images} test images (one image = {100 / images:.2f} points).")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--result_dir", default=None, help="where the stages write (default: a temporary folder)")
    p.add_argument("--data_dir", default=None,
                   help="where the dataset is written and kept (default: a temporary folder, removed at the end "
                        "unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    work = None if args.result_dir and args.data_dir else tempfile.mkdtemp(prefix="dynprune-demo-")
    result_dir = args.result_dir or os.path.join(work, "results")
    data_dir = args.data_dir or os.path.join(work, "data")
    t0 = time.time()
    try:
        if not os.path.isdir(os.path.join(data_dir, "train")):
            write_synthetic(data_dir, layout="png", seed=0, **DATA)
            print(f"wrote {DATA['num_classes']} classes x ({DATA['train_per_class']} train + "
                  f"{DATA['test_per_class']} test) {DATA['size']}x{DATA['size']} PNGs to {data_dir}")
        paths = ["--result_dir", result_dir, "--data_dir", data_dir]
        times = {"stage 1": run("main_sp.py", *STAGE1, *COMMON, *paths)}
        config = os.path.join(result_dir, "demo_config.json")
        write_json(config, {"result_dir": result_dir, "data_dir": data_dir, "img_type": "png", "resize": DATA["size"],
                            "num_workers": 2, "device": "cpu", **STAGE2})
        times["stage 2"] = run("main_prune.py", "--config_path", config)
        times["stage 3"] = run("main_rl_prune.py", *STAGE3, *COMMON, *paths)
        print(f"\n== table ({result_dir}/table.md) ==\n")
        print(open(os.path.join(result_dir, "table.md")).read())
        print(conclusion(os.path.join(result_dir, "table.json")))
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f", total {time.time() - t0:.0f}")
    finally:
        if work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif work:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
