"""The counterfactual controller with K sampled blocks flipped per step (--flip_blocks K) against the full form
(every block flipped): validation accuracy at the same GFLOPs target, routes, and stage 3's time.

    nice -n 5 python -m evaluation.flip_blocks                 # digits, 3 seeds, K = 0 (full), 2 and 4; ~1 h on 2 cores
    python -m evaluation.flip_blocks --quick                   # a smoke run (its own --out and --results)

Per seed: scikit-learn's digits at 16x16 with a graded spread of difficulty (evaluation/digits.py, 5 levels of
contrast loss and noise; images of every level in train and test), ResNet-20 width 1 (8 switches);
stage 1 (15 epochs), stage 2 (compression 0.6, 5 epochs), then stage 3 once per K from the same stage-2
network and seed (12 epochs, lr 0.05, alpha 1.0 adapted to the target, 6 route epochs), the target the
middle of the gated range: every network ends calibrated to the same GFLOPs. Every run holds out 10% of the
training images (the same ones) and ends on that validation split (--final_split val): the test split is
never read. Reported per K: validation accuracy of the routed network (mean and per seed), its GFLOPs, the
number of distinct routes its greedy switches take on the validation images, and stage 3's wall time.
Runs are cached under --out (evaluation/runner.py's tasks); the table goes to --results (markdown + JSON).
"""
import argparse
import os
import statistics

import torch

from evaluation.runner import Task, run_all
from utils.files import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALES = {
    "digits": dict(resize=16, depth=20, width=1, bs=64, val_split=0.1, seeds=(0, 1, 2), flips=(0, 2, 4),
                   sp_epochs=15, prune=dict(compression=0.6, epochs=5, lr=0.02, fisher_batches=16),
                   rl=dict(epochs=12, lr=0.05, alpha=1.0, rl_weight=0.01, route_epochs=6, route_lr=0.02)),
    "quick": dict(resize=8, depth=8, width=1, bs=32, val_split=0.2, seeds=(0,), flips=(0, 1),
                  sp_epochs=1, prune=dict(compression=0.5, epochs=1, lr=0.01, fisher_batches=2),
                  rl=dict(epochs=1, lr=0.01, alpha=1.0, rl_weight=0.01, route_epochs=0, route_lr=0.01)),
}


def common(s, data, seed):
    return ["--bs", str(s["bs"]), "--num_workers", "0", "--seed", str(seed), "--device", "cpu", "--data_dir", data,
            "--val_split", str(s["val_split"]), "--final_split", "val"]


def target(run):
    """The middle of the stage-2 network's gated range: half of its gated blocks' GFLOPs above the cost with
    every gated block skipped."""
    from runtime.predict import checkpoint_costs
    from utils.flops import skipped_flops
    costs = checkpoint_costs(os.path.join(run, "prune", "checkpoint.pt"), ("prune",), "--checkpoint")
    return round((skipped_flops(costs) + 0.5 * sum(costs["blocks"])) / 1e9, 9)


def plan(s, out, data):
    tasks = []
    for seed in s["seeds"]:
        run = os.path.join(out, f"seed{seed}")
        cfg = os.path.join(run, "prune_config.json")
        p = s["prune"]
        prune = {"result_dir": run, "data_dir": data, "num_workers": 0, "compression": p["compression"],
                 "epochs": p["epochs"], "lr": p["lr"], "bs": s["bs"], "fisher_batches": p["fisher_batches"],
                 "seed": seed, "device": "cpu", "val_split": s["val_split"], "final_split": "val"}
        tasks += [Task(f"seed{seed}/sp", ["main_sp.py", "--depth", str(s["depth"]), "--width", str(s["width"]),
                                          "--epochs", str(s["sp_epochs"]), "--lr", "0.1", "--resize", str(s["resize"]),
                                          "--augment", "crop", "--result_dir", run, *common(s, data, seed)],
                       os.path.join(run, "sp", "metrics.json")),
                  Task(f"seed{seed}/prune", ["main_prune.py", "--config_path", cfg],
                       os.path.join(run, "prune", "metrics.json"), [f"seed{seed}/sp"], prune, cfg)]
        r = s["rl"]
        for k in s["flips"]:
            tasks.append(Task(f"seed{seed}/rl_k{k}", lambda run=run, seed=seed, k=k: [
                "main_rl_prune.py", "--checkpoint", os.path.join(run, "prune", "checkpoint.pt"),
                "--result_dir", os.path.join(run, f"k{k}"), "--controller", "counterfactual", "--flip_blocks", str(k),
                "--target_gflops", repr(target(run)), "--epochs", str(r["epochs"]), "--lr", repr(r["lr"]),
                "--alpha", repr(r["alpha"]), "--rl_weight", repr(r["rl_weight"]), "--route_epochs",
                str(r["route_epochs"]), "--route_lr", repr(r["route_lr"]), *common(s, data, seed)],
                os.path.join(run, f"k{k}", "rl", "metrics.json"), [f"seed{seed}/prune"]))
    return tasks


def distinct_routes(checkpoint, data, s, seed):
    """How many different greedy routes the network takes on the validation images."""
    from runtime.predict import load, predict
    from utils.data import DataSettings
    from utils.dist import Context
    settings = DataSettings(data_dir=data, bs=256, val_split=s["val_split"], seed=seed, final_split="val")
    net = load(checkpoint, settings, Context(device=torch.device("cpu")), ("rl",), "--checkpoint")
    return len({tuple(r) for r in predict(net.ddp, net.data.eval).routes.tolist()})


def report(s, out, data, times):
    rows = {}
    for k in s["flips"]:
        per = []
        for seed in s["seeds"]:
            rdir = os.path.join(out, f"seed{seed}", f"k{k}")
            m = read_json(os.path.join(rdir, "rl", "metrics.json"))
            per.append({"seed": seed, "val_acc": m["val_acc"], "val_images": m["val_images"], "val_gflops": m["val_gflops"],
                        "target_gflops": m["target_gflops"], "routes": distinct_routes(
                            os.path.join(rdir, "rl", "checkpoint.pt"), data, s, seed),
                        "stage3_seconds": times.get(f"seed{seed}/rl_k{k}")})
        rows[k] = {"per_seed": per, "val_acc_mean": statistics.mean(r["val_acc"] for r in per),
                   "val_acc_std": statistics.stdev(r["val_acc"] for r in per) if len(per) > 1 else 0.0}
    return rows


def markdown(s, rows, command):
    lines = [f"`{command}`: digits {s['resize']}x{s['resize']} (graded difficulty), ResNet-{s['depth']} width {s['width']} "
             f"({(s['depth'] - 2) // 2 - 1} switches), seeds {', '.join(map(str, s['seeds']))}; stage 3 from the "
             f"same stage-2 network per seed, calibrated to the same GFLOPs target; validation split only "
             f"({next(iter(rows.values()))['per_seed'][0]['val_images']} images: one image is "
             f"{100 / next(iter(rows.values()))['per_seed'][0]['val_images']:.2f} points). Stage 3 seconds: wall "
             f"time of the whole stage (training, route epochs, evaluations), two runs at a time on a shared "
             f"machine: a rough guide only.", "",
             "| flipped blocks per step | val acc (mean ± std) | per seed | val GFLOPs / target | distinct routes | "
             "stage 3 seconds |", "|---|---|---|---|---|---|"]
    for k, row in rows.items():
        per = row["per_seed"]
        name = "all (full form)" if k == 0 else f"{k} (sampled)"
        cells = ["/".join(f"{r['val_acc']:.2f}" for r in per),
                 "/".join(f"{r['val_gflops'] / r['target_gflops']:.3f}" for r in per),
                 "/".join(str(r["routes"]) for r in per),
                 "/".join(f"{r['stage3_seconds']:.0f}" if r["stage3_seconds"] else "-" for r in per)]
        lines.append(f"| {name} | {row['val_acc_mean']:.2f} ± {row['val_acc_std']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny network, one seed, one epoch")
    p.add_argument("--out", default=None, help="work folder (default: evaluation/out/flip_blocks[_quick])")
    p.add_argument("--results", default=None, help="where the table goes (default: evaluation/results/flip_blocks "
                                                    "or, --quick, evaluation/out/flip_blocks_quick/results)")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    s = SCALES["quick" if args.quick else "digits"]
    out = args.out or os.path.join(ROOT, "evaluation", "out", "flip_blocks_quick" if args.quick else "flip_blocks")
    results = args.results or (os.path.join(out, "results") if args.quick else
                               os.path.join(ROOT, "evaluation", "results", "flip_blocks"))
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "test")):
        from evaluation.digits import write_digits
        write_digits(data + ".partial", size=s["resize"], levels=5)
        os.replace(data + ".partial", data)
    tasks = plan(s, out, data)
    run_all(tasks, args.jobs, 1, os.path.join(out, "logs"))
    times = {t.name: t.seconds for t in tasks}
    rows = report(s, out, data, times)
    command = "python -m evaluation.flip_blocks" + (" --quick" if args.quick else "")
    os.makedirs(results, exist_ok=True)
    write_json(os.path.join(results, "flip_blocks.json"), {str(k): v for k, v in rows.items()})
    text = markdown(s, rows, command)
    with open(os.path.join(results, "flip_blocks.md"), "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
