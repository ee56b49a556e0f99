"""Do the switches route by difficulty? For each checkpoint, the test images of a dataset written with a
spread of difficulty (evaluation/digits.write_digits' hard_fraction: <data_dir>/hard.txt lists the degraded
images) split into hard and easy ones, and for each group: accuracy, GFLOPs per image as executed (greedy
routes, skipped blocks not counted), and every switch's greedy execution rate.

    python -m evaluation.routes_by_difficulty CKPT [CKPT ...] --data_dir DIR [--out routes_by_difficulty.json]

Images go through the checkpoint's recorded input pipeline (utils.data.Preprocess), as a deployed model
sees them, in batches of --bs.
"""
import argparse
import json
import os

import torch

from runtime.checkpoint import load_model
from runtime.predict import file_batches, predict
from utils.cli import Parser
from utils.errors import UserError, run_main
from utils.flops import measure_costs


def test_images(data_dir):
    """[(path relative to data_dir, class name, hard?)] of the test split, in sorted order."""
    listing = os.path.join(data_dir, "hard.txt")
    if not os.path.isfile(listing):
        raise UserError(f"{listing} does not exist: --data_dir must be written with a spread of difficulty "
                        f"(evaluation/study.py --mixed, or evaluation/digits.write_digits(..., hard_fraction=0.5))")
    with open(listing) as f:
        hard = set(f.read().split())
    test = os.path.join(data_dir, "test")
    return [(f"test/{c}/{name}", c, f"test/{c}/{name}" in hard)
            for c in sorted(os.listdir(test)) for name in sorted(os.listdir(os.path.join(test, c)))]


@torch.no_grad()
def by_difficulty(path, data_dir, bs):
    """{"hard"/"easy": {"images", "acc" (%), "gflops_per_image", "exec_rate" (per switch)}} of one checkpoint
    on the test split, greedy routes (`hard` mode, eval)."""
    model, prep = load_model(path, mode="hard")
    images = test_images(data_dir)
    got = predict(model, file_batches(prep, [os.path.join(data_dir, p) for p, _, _ in images],
                                      [c for _, c, _ in images], bs), measure_costs(model, prep.size))
    correct, flops, actions = got.correct, got.flops, got.routes
    hard = torch.tensor([h for _, _, h in images])
    out = {}
    for name, mask in (("hard", hard), ("easy", ~hard)):
        out[name] = {"images": int(mask.sum()), "acc": 100 * correct[mask].float().mean().item(),
                     "gflops_per_image": flops[mask].mean().item() / 1e9,
                     "exec_rate": actions[mask].float().mean(0).tolist()}
    return out


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.bs < 1:
        p.error(f"--bs {args.bs} must be >= 1")
    results = {path: by_difficulty(path, args.data_dir, args.bs) for path in args.checkpoints}
    for path, r in results.items():
        print(path)
        for name, g in r.items():
            rates = " ".join(f"{100 * x:.0f}%" for x in g["exec_rate"])
            print(f"  {name}: {g['images']} images, acc {g['acc']:.2f}%, {g['gflops_per_image']:.4f} GFLOPs, "
                  f"execution rate per switch {rates}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    run_main(main)
