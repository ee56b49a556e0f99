"""Which criterion should stage 2's global threshold rank directions by? Measured on digits, 3 seeds.

    OMP_WAIT_POLICY=passive nice python bench/bench_criteria.py [--seeds 0 1 2]

Per seed: ResNet-32 at width 1 trained by main_sp.py (20 epochs); Torch-Pruning's global magnitude channel
pruning at the parameter count of our compression 0.6 (bench/peer_torch_pruning.py, stage 2's fine-tuning);
then main_prune.py with each criterion (score, score_per_param, score_per_flop) at equal parameters
(compression 0.6) and at equal GFLOPs (gflops = the Torch-Pruning network's), every run fine-tuned alike
(5 epochs, lr 0.01). Everything is cached under bench/out/criteria/ (git-ignored; delete it to rerun).
Prints the table of test accuracy (mean ± sample std over seeds, and per seed), GFLOPs per image of the
static network (every block run) and parameters; writes bench/out/criteria/criteria.json. (The default
score_per_cost is score_per_param for a compression target and score_per_flop for a GFLOPs one: not run again.)
"""
import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names
from bench.bench_prune import OUT, digits, run  # noqa: E402
from bench.peer_torch_pruning import shaped_like  # noqa: E402
from pruners import model_flops  # noqa: E402

STAGE1 = dict(depth=32, width=1, epochs=20, lr=0.1, bs=64)
STAGE2 = dict(epochs=5, lr=0.01, fisher_batches=23)
COMPRESSION = 0.6
PEER = "global_magnitude"
RANKINGS = ("score", "score_per_param", "score_per_flop")  # score_per_cost is one of the last two


def done(path):
    return os.path.isfile(os.path.join(path, "metrics.json"))


def stage2(run_dir, data, sp_dir, seed, **target):
    """main_prune.py into run_dir/prune from the stage-1 run in sp_dir (linked as run_dir/sp, which the
    peer script reads)."""
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, "sp")):
        os.symlink(sp_dir, os.path.join(run_dir, "sp"))
    if not done(os.path.join(run_dir, "prune")):
        config = {"result_dir": run_dir, "data_dir": data, "num_workers": 0, "device": "cpu", "seed": seed,
                  "bs": STAGE1["bs"], **STAGE2, **target}
        with open(os.path.join(run_dir, "prune.json"), "w") as f:
            json.dump(config, f, indent=1)
        run(["main_prune.py", "--config_path", os.path.join(run_dir, "prune.json")], os.path.join(run_dir, "prune.log"))
    with open(os.path.join(run_dir, "prune", "metrics.json")) as f:
        m = json.load(f)
    return {"test_acc": m["test_acc"], "gflops": m["dense_gflops"], "params": m["params"],
            "compression": m["compression"], "acc_before_finetune": m["rounds"][0]["test_acc_before_finetune"]}


def peer(run_dir):
    """Torch-Pruning at the parameter count of the stage-2 run in run_dir, fine-tuned alike."""
    out = os.path.join(run_dir, "peer", PEER)
    if not done(out):
        run(["bench/peer_torch_pruning.py", "finetune", "--result_dir", run_dir, "--method", PEER, "--threads", "2"],
            os.path.join(run_dir, f"peer_{PEER}.log"))
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    saved = torch.load(os.path.join(out, "weights.pt"), weights_only=True)
    model = shaped_like(saved["model"], saved["arch"])
    return {"test_acc": m["test_acc"], "gflops": model_flops(model, 32) / 1e9, "params": m["params"],
            "compression": m["compression"], "acc_before_finetune": m["test_acc_after_prune"]}


def one_seed(seed, data, out):
    base = os.path.join(out, f"seed{seed}")
    sp_dir = os.path.join(base, "sp")
    if not done(sp_dir):
        os.makedirs(base, exist_ok=True)
        run(["main_sp.py", "--depth", str(STAGE1["depth"]), "--width", str(STAGE1["width"]), "--epochs",
             str(STAGE1["epochs"]), "--lr", str(STAGE1["lr"]), "--bs", str(STAGE1["bs"]), "--resize", "32",
             "--num_workers", "0", "--device", "cpu", "--seed", str(seed), "--data_dir", data, "--result_dir", base],
            os.path.join(base, "sp.log"))
    rows = {}
    for criterion in RANKINGS:
        rows[f"params/{criterion}"] = stage2(os.path.join(base, f"params_{criterion}"), data, sp_dir, seed,
                                             compression=COMPRESSION, criterion=criterion)
    rows["params/torch-pruning"] = peer(os.path.join(base, "params_score"))
    for criterion in RANKINGS:
        rows[f"gflops/{criterion}"] = stage2(os.path.join(base, f"gflops_{criterion}"), data, sp_dir, seed,
                                             gflops=rows["params/torch-pruning"]["gflops"], criterion=criterion)
    with open(os.path.join(sp_dir, "metrics.json")) as f:
        m = json.load(f)
    rows["unpruned"] = {"test_acc": m["test_acc"], "gflops": m["gflops_per_image"], "params": m["params"],
                        "compression": 0.0, "acc_before_finetune": None}
    return rows


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(OUT, "criteria"))
    args = p.parse_args()
    data = digits()
    per_seed = {seed: one_seed(seed, data, args.out) for seed in args.seeds}
    names = list(per_seed[args.seeds[0]])
    print(f"digits, ResNet-32 width 1, stage 1 {STAGE1['epochs']} epochs, fine-tuning {STAGE2['epochs']} epochs, "
          f"seeds {args.seeds}; accuracy on test (mean ± std), GFLOPs of the static network")
    print("| setting | criterion | test acc (%) | per seed | acc. before fine-tuning | GFLOPs | params |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for name in names:
        rows = [per_seed[s][name] for s in args.seeds]
        acc = mean_std([r["test_acc"] for r in rows])
        gflops = mean_std([r["gflops"] for r in rows])
        params = mean_std([r["params"] for r in rows])
        before = [r["acc_before_finetune"] for r in rows if r["acc_before_finetune"] is not None]
        table[name] = {"acc": acc, "gflops": gflops, "params": params, "per_seed": rows}
        setting, _, criterion = name.partition("/")
        seeds = "/".join(f"{r['test_acc']:.2f}" for r in rows)
        before = f"{statistics.mean(before):.1f}" if before else "-"
        print(f"| {setting} | {criterion or '-'} | {acc[0]:.2f} ± {acc[1]:.2f} | {seeds} | {before} | "
              f"{gflops[0]:.4f} ± {gflops[1]:.4f} | {params[0]:,.0f} |")
    with open(os.path.join(args.out, "criteria.json"), "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
