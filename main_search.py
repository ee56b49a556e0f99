"""The original protocol in one command: from a stage-1 result, the highest static compression whose fine-tuned
network stays within --budget points of the unpruned network's accuracy, then on that network the lowest
stage-3 GFLOPs target that still does, both chosen on the validation split of the stage-1 run (never on
test); then each chosen network is evaluated once on the test split.

    python main_search.py --result_dir results --prune_config config.json [--budget 1.0] [--storage URL]

Reads <result_dir>/sp/checkpoint.pt (stage 1, run with --val_split > 0) and writes <result_dir>/search/:
search.db (the Optuna studies), trials/ (every trial's stage folder), trials.json, table.md, table.json
and pareto.png. Run the same command again to continue an interrupted search, or on several machines with
one --storage (and a shared --result_dir) to split its trials (docs/search.md).
"""
import json
import os
import time

import optuna

import main_prune
import main_rl_prune
from pruners.config import validate
from runtime.checkpoint import load_checkpoint
from runtime.stage import check_result_dir
from search.phase import open_storage
from search.protocol import Search
from search.trials import DYNAMIC_KNOBS, Stages, Trials, stage3_argv, stage3_knob
from utils.cli import Formatter, Parser, check_finite
from utils.dist import setup
from utils.errors import UserError, run_main
from utils.lineage import check_chain

DATA_KEYS = ("data_dir", "img_type", "resize", "num_workers")
SET_BY_SEARCH = ("result_dir", "checkpoint", "prune_mode", "compression", "ratio", "rounds", "final_split",
                 "resume", "device", "val_split", "seed", *DATA_KEYS)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    p.add_argument("--result_dir", default="results", help="reads <result_dir>/sp/, writes <result_dir>/search/")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="the stage-1 checkpoint (default: <result_dir>/sp/checkpoint.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; none: cuda when available")
    d = p.add_argument_group("data (default: the stage-1 run's; its --val_split and --seed give the split)")
    for name, kind in (("data_dir", str), ("img_type", str), ("resize", int), ("num_workers", int)):
        d.add_argument(f"--{name}", type=kind, default=None)
    s = p.add_argument_group("search")
    s.add_argument("--budget", type=float, default=1.0,
                   help="accuracy points (validation split) a chosen network may lose against the unpruned one")
    s.add_argument("--storage", default=None, help="Optuna RDB URL shared by every worker (default: "
                   "sqlite:///<result_dir>/search/search.db); e.g. postgresql://user@host/db")
    s.add_argument("--study_name", default="search", help="prefix of the studies in --storage")
    s.add_argument("--min_compression", type=float, default=0.1, help="static phase: low end of the bisection")
    s.add_argument("--max_compression", type=float, default=0.9, help="static phase: high end (equal to "
                   "--min_compression: that one compression)")
    s.add_argument("--static_trials", type=int, default=6, help="stage-2 runs of the static phase, at most")
    s.add_argument("--dynamic_trials", type=int, default=6, help="stage-3 runs per network of the dynamic "
                   "phase, at most")
    s.add_argument("--dynamic_networks", type=int, default=1, help="static networks the dynamic phase starts "
                   "from: the most compressed within budget, and this many - 1 of the next ones")
    s.add_argument("--knob", choices=DYNAMIC_KNOBS, default=None, help="what the dynamic phase bisects: stage "
                   "3's --target_gflops (default where stage 3 has it) or --alpha (a fixed skip reward: steadier "
                   "where the dual ascent and the final calibration cost accuracy)")
    s.add_argument("--max_alpha", type=float, default=10.0, help="high end of alpha (--knob alpha, or where "
                   "stage 3 has no --target_gflops)")
    st = p.add_argument_group("stages")
    st.add_argument("--prune_config", default=None, metavar="PATH", help="stage-2 config of every static trial "
                    "(epochs, lr, fisher_batches ...; target, data and result keys are set by the search)")
    st.add_argument("--rl_epochs", type=int, default=100, help="stage 3: --epochs")
    st.add_argument("--rl_lr", type=float, default=0.001, help="stage 3: --lr")
    st.add_argument("--rl_bs", type=int, default=256, help="stage 3: --bs")
    st.add_argument("--rl_weight", type=float, default=0.1, help="stage 3: --rl_weight")
    st.add_argument("--gamma", type=float, default=1.0, help="stage 3: --gamma")
    st.add_argument("--rl_alpha", type=float, default=0.1, help="stage 3: --alpha, where the knob is the GFLOPs "
                    "target (the dual ascent's starting value)")
    st.add_argument("--rl_route_epochs", type=int, default=0, help="stage 3: --route_epochs")
    st.add_argument("--rl_route_lr", type=float, default=None, help="stage 3: --route_lr (default: its own, "
                    "--rl_lr / 10)")
    return p.parse_args(argv)


def check_args(args):
    check_finite(args)
    checks = [("budget", args.budget >= 0, "must be >= 0"),
              ("min_compression", 0 < args.min_compression < 1, "must be in (0, 1)"),
              ("max_compression", args.min_compression <= args.max_compression < 1,
               "must be in [--min_compression, 1)"),
              ("static_trials", args.static_trials >= 1, "must be >= 1"),
              ("dynamic_trials", args.dynamic_trials >= 0, "must be >= 0"),
              ("dynamic_networks", args.dynamic_networks >= 1, "must be >= 1"),
              ("max_alpha", args.max_alpha > 0, "must be > 0")]  # stage 3's flags: search.trials.stage3_argv
    for name, ok, why in checks:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name)} {why}")


def stage1_data(args, ckpt, path):
    """The data flags and validation split of the search: the stage-1 run's (flags override data_dir ...)."""
    run = ckpt.get("args") or {}
    if not run.get("val_split"):
        raise UserError(f"--checkpoint {path}: its stage-1 run trained on every training image (--val_split 0); "
                        f"the search needs a validation split held out of it: run main_sp.py with --val_split "
                        f"> 0 (e.g. 0.1)")
    data = {k: getattr(args, k) if getattr(args, k) is not None else run.get(k) for k in DATA_KEYS}
    recorded = ckpt.get("pipeline") or {}
    if data["resize"] is None:  # the stage-1 run took its default: the side its pipeline records
        data["resize"] = recorded.get("resize", 32)
    return {**data, "val_split": run["val_split"], "seed": run.get("seed", 0)}


def prune_base(args, data, stage1_path):
    """The stage-2 config every static trial starts from, checked now (one line naming a bad key)."""
    base = {}
    if args.prune_config:
        try:
            with open(args.prune_config) as f:
                base = json.load(f)
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
    check_args(args)
    stages = Stages(prune=main_prune.main, rl=main_rl_prune.main, rl_parse_args=main_rl_prune.parse_args,
                    rl_check_args=main_rl_prune.check_args)
    knob_name = args.knob or stage3_knob(stages)
    rl_argv = stage3_argv(args, knob_name, stages)  # stage 3's flags, checked by stage 3's checks before any work
    stage1_path = args.checkpoint or os.path.join(args.result_dir, "sp", "checkpoint.pt")
    if not os.path.isfile(stage1_path):
        raise UserError(f"no stage-1 checkpoint at {stage1_path}: run main_sp.py (with --val_split > 0) first, "
                        f"or give --checkpoint")
    if not args.checkpoint:  # this --result_dir's stage 1 must be the network its metrics describe
        check_chain(args.result_dir, ("sp",))
    stage1 = load_checkpoint(stage1_path, ("sp",), "--checkpoint")
    data = stage1_data(args, stage1, stage1_path)
    eval_bs = (stage1.get("args") or {}).get("bs", 128)  # the stage-1 run's: fits its training split
    prune_config = prune_base(args, data, stage1_path)
    check_result_dir(args.result_dir)
    search_dir = os.path.join(args.result_dir, "search")
    os.makedirs(search_dir, exist_ok=True)
    ctx = setup(args.device, data["seed"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    storage = open_storage(args.storage or f"sqlite:///{os.path.abspath(search_dir)}/search.db")
    trials = Trials(search_dir, os.path.abspath(stage1_path), data, prune_config, rl_argv, args.device, stages)
    Search(args, trials, stage1_path, eval_bs, knob_name, ctx).run(storage, t0)  # search/protocol.py


if __name__ == "__main__":
    run_main(main)
