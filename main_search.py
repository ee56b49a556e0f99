"""The original protocol in one command: from a stage-1 result, the highest static compression whose fine-tuned
network stays within --budget points of the unpruned network's accuracy, then on that network the lowest
stage-3 GFLOPs target that still does, both chosen on the validation split of the stage-1 run (never on
test); then each chosen network is evaluated once on the test split.

    python main_search.py --result_dir results --prune_config config.json [--budget 1.0] [--storage URL]

What it writes, resuming, several workers: docs/search.md.
"""
import dataclasses
import os
import time

import optuna

from pruners.config import validate
from runtime.stage import check_result_dir, starting_checkpoint
from search.phase import open_storage
from search.protocol import TITLES, Search, SearchSettings
from search.trials import Trials, stage3_settings
from utils.cli import check, parse
from utils.dist import setup
from utils.errors import UserError, run_main
from utils.files import read_json

DATA_KEYS = ("data_dir", "img_type", "resize", "num_workers")
SET_BY_SEARCH = ("result_dir", "checkpoint", "prune_mode", "compression", "ratio", "rounds", "final_split",
                 "resume", "device", "val_split", "seed", *DATA_KEYS)


def parse_args(argv=None):
    return parse(SearchSettings, __doc__.split("\n\n")[0], TITLES, argv)


def stage1_data(args, ckpt, path):
    """The data flags and validation split of the search: the stage-1 run's (flags override data_dir ...)."""
    run = ckpt.get("args") or {}
    if not run.get("val_split"):
        raise UserError(f"--checkpoint {path}: its stage-1 run trained on every training image (--val_split 0); "
                        f"the search needs a validation split held out of it: run main_sp.py with --val_split "
                        f"> 0 (e.g. 0.1)")
    data = {k: getattr(args, k) if getattr(args, k) is not None else run.get(k) for k in DATA_KEYS}
    if data["resize"] is None:  # the stage-1 run took its default: the side its pipeline records
        data["resize"] = (ckpt.get("pipeline") or {}).get("resize", 32)
    return {**data, "val_split": run["val_split"], "seed": run.get("seed", 0)}


def prune_base(args, data, stage1_path):
    """The stage-2 config every static trial starts from, checked now (one line naming a bad key)."""
    base = {}
    if args.prune_config:
        try:
            base = read_json(args.prune_config)
        except (OSError, ValueError) as e:
            raise UserError(f"--prune_config {args.prune_config}: cannot read it as JSON ({e})") from None
        if not isinstance(base, dict):
            raise UserError(f"--prune_config {args.prune_config}: expected a JSON object of keys")
    base = {k: v for k, v in base.items() if k not in SET_BY_SEARCH}
    validate({**base, **data, "result_dir": args.result_dir, "checkpoint": stage1_path,
              "compression": args.max_compression}, where=args.prune_config or "the default stage-2 config")
    return base


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    check(args)
    if args.max_compression < args.min_compression:
        raise UserError(f"--max_compression {args.max_compression} must be in [--min_compression, 1)")
    rl_settings = stage3_settings(args, args.knob)  # checked by stage 3's checks before any work
    stage1_path, stage1, _ = starting_checkpoint(args.checkpoint, args.result_dir, ("sp",), "--checkpoint", (
        f"no stage-1 checkpoint at {os.path.join(args.result_dir, 'sp', 'checkpoint.pt')}: run main_sp.py (with "
        f"--val_split > 0) first, or give --checkpoint"), lineage=False)
    data = stage1_data(args, stage1, stage1_path)
    rl_settings = dataclasses.replace(rl_settings, **data)
    eval_bs = (stage1.get("args") or {}).get("bs", 128)  # the stage-1 run's: fits its training split
    prune_config = prune_base(args, data, stage1_path)
    check_result_dir(args.result_dir)
    search_dir = os.path.join(args.result_dir, "search")
    os.makedirs(search_dir, exist_ok=True)
    ctx = setup(args.device, data["seed"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    storage = open_storage(args.storage or f"sqlite:///{os.path.abspath(search_dir)}/search.db")
    trials = Trials(search_dir, os.path.abspath(stage1_path), data, prune_config, rl_settings, args.device)
    Search(args, trials, stage1_path, eval_bs, args.knob, ctx).run(storage, t0)  # search/protocol.py


if __name__ == "__main__":
    run_main(main)
