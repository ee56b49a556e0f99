"""The best fixed route of a network at a GFLOPs budget: the same blocks skipped for every image, chosen
greedily on the validation split (evaluation/routes.best_fixed_route), BN statistics re-estimated on training
images under that route (evaluation/routes.recalibrate_route), then evaluated once on test. The baseline that
per-image routing must beat at equal GFLOPs (evaluation/study.py).

    python -m evaluation.fixed_route --checkpoint RL_CKPT [--checkpoint PRUNE_CKPT ...] --budget_gflops G \
        --data_dir DIR --val_split 0.1 --seed 0 --out route.json

The blocks are coarse (one block of ResNet-20 is about a ninth of its cost), so the greedy route lands at or
under the budget; the route one greedy step before it (just over the budget) is evaluated too.
"""
import argparse
import os

from evaluation.routes import best_fixed_route, evaluate_route, recalibrate_route
from runtime import predict
from utils.dist import setup
from utils.files import write_json
from utils.data import DataSettings


def load(path, data, ctx, bs):
    net = predict.load(path, DataSettings.of(data, bs=bs), ctx, flag="--checkpoint")
    return net.ddp, net.data, net.costs


def deployed(path, data, ctx, bs, route):
    """A fresh copy of the network with BN re-estimated under `route`: its val and test numbers."""
    ddp, loaded, costs = load(path, data, ctx, bs)
    recalibrate_route(ddp, loaded.train, ctx, route, batches=len(loaded.train))
    val = evaluate_route(ddp, loaded.eval, ctx, costs, route)
    test = evaluate_route(ddp, loaded.test, ctx, costs, route)
    return {"route": route, "gflops_per_image": test["gflops"], "val_acc": val["acc"], "test_acc": test["acc"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="a network (repeat for several)")
    p.add_argument("--budget_gflops", type=float, required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--img_type", default="png")
    p.add_argument("--val_split", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bs", type=int, default=64, help="batch size (BN re-estimation and evaluation)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data = {"data_dir": args.data_dir, "img_type": args.img_type, "resize": None, "num_workers": 0,
            "val_split": args.val_split, "seed": args.seed}
    ctx = setup(args.device, args.seed)
    results = {}
    for path in args.checkpoint:
        ddp, loaded, costs = load(path, data, ctx, args.bs)
        best = best_fixed_route(ddp, loaded.eval, ctx, costs, args.budget_gflops)
        entry = {"greedy_history": best["history"], "at_or_under": deployed(path, data, ctx, args.bs, best["route"])}
        if best["history"]:  # the step before the last drop: just over the budget
            over = list(best["route"])
            over[best["history"][-1][0]] = 1
            entry["over"] = deployed(path, data, ctx, args.bs, over)
        results[path] = entry
        print(f"[route] {path}: " + "; ".join(f"{k} {v['test_acc']:.2f}% at {v['gflops_per_image']:.4f} GFLOPs"
                                            for k, v in entry.items() if k != "greedy_history"), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, {"budget_gflops": args.budget_gflops, "networks": results})


if __name__ == "__main__":
    main()
