"""Mean switch probability p (execute the block) per switch over the validation split, for each checkpoint
given: how far stage 3 moved the switches even where the greedy route (p > 0.5) did not change.

    python -m evaluation.switch_probs CKPT [CKPT ...] --data_dir DIR --val_split 0.1 --seed 0 [--out probs.json]
"""
import argparse
import json

from runtime import predict
from utils.dist import setup
from utils.data import DataSettings


def mean_probs(path, data, ctx, bs):
    net = predict.load(path, DataSettings.of(data, bs=bs, final_split="val"), ctx)
    probs = predict.predict(net.ddp, net.data.eval).probs  # (N, switches)
    return {"mean_p": probs.mean(0).tolist(), "std_p": probs.std(0).tolist(), "images": len(probs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--val_split", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    data = {"data_dir": args.data_dir, "img_type": "png", "resize": None, "num_workers": 0,
            "val_split": args.val_split, "seed": args.seed}
    ctx = setup("cpu", args.seed)
    out = {path: mean_probs(path, data, ctx, args.bs) for path in args.checkpoints}
    for path, r in out.items():
        print(path, " ".join(f"{v:.4f}" for v in r["mean_p"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
