"""Stage 3: dynamic pruning. The switches of the stage-2 network (or of the stage-1 network, for dynamic
pruning alone) learn by REINFORCE to skip blocks per image, the backbone by cross-entropy on the routes
taken (gates/policy.py). Writes <result_dir>/rl/{checkpoint.pt, metrics.json, tb/}: the row "static +
dynamic pruning", then the whole table as <result_dir>/table.md and table.json."""
import json
import os

import torch

from gates.policy import BASELINES, Baseline, ReinforceStep
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import base_parser, check_ranges
from utils.dist import setup, teardown
from utils.engine import make_scheduler, prepare
from utils.errors import UserError, run_main
from utils.flops import count_params, measure_costs
from utils.stage import StageRun, check_batch_shapes, check_result_dir, load_data, restore_training_state, resume_path
from utils.table import write_table


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.set_defaults(epochs=100, lr=0.001, bs=256)  # the seed's stage-3 command
    m = p.add_argument_group("model (taken from the checkpoint; flags given must agree with it)")
    m.add_argument("--network", default=None, help="if given, must be the checkpoint's network (resnet)")
    m.add_argument("--depth", type=int, default=None, help="if given, must be the checkpoint's depth")
    m.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="stage-2 or stage-1 checkpoint to start from (default: <result_dir>/prune/checkpoint.pt "
                        "if present, else <result_dir>/sp/checkpoint.pt)")
    r = p.add_argument_group("REINFORCE")
    r.add_argument("--alpha", type=float, default=0.1, help="total reward for skipping every gated block")
    r.add_argument("--gamma", type=float, default=1.0, help="discount of the returns, in [0, 1]")
    r.add_argument("--rl_weight", type=float, default=0.1, help="weight of the policy loss beside the CE")
    r.add_argument("--baseline", default="moving", choices=BASELINES,
                   help="per-switch baseline: moving average of the returns, or the batch mean")
    r.add_argument("--baseline_momentum", type=float, default=0.9, help="of the moving-average baseline")
    return p.parse_args(argv)


def check_args(args):
    check_ranges(args)
    for name, ok, why in [("alpha", args.alpha >= 0, "must be >= 0"), ("gamma", 0 <= args.gamma <= 1, "must be in [0, 1]"),
                          ("rl_weight", args.rl_weight >= 0, "must be >= 0"),
                          ("baseline_momentum", 0 <= args.baseline_momentum < 1, "must be in [0, 1)")]:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name)} {why}")


def source_path(args):
    if args.checkpoint:
        return args.checkpoint
    for stage in ("prune", "sp"):
        path = os.path.join(args.result_dir, stage, "checkpoint.pt")
        if os.path.isfile(path):
            return path
    raise UserError(f"no checkpoint to start from: neither {args.result_dir}/prune/checkpoint.pt nor "
                    f"{args.result_dir}/sp/checkpoint.pt exists (run main_sp.py and main_prune.py first, "
                    f"or give --checkpoint)")


def source_compression(ckpt, path, params):
    """Fraction of the stage-1 parameters that the starting network (holding `params`) has removed: 0 for a
    stage-1 network; for a stage-2 one, from the stage-1 size it records (or the compression recorded in
    the metrics.json beside it); None if neither is there."""
    if ckpt["stage"] == "sp":
        return 0.0
    if ckpt.get("params_stage1"):
        return 1 - params / ckpt["params_stage1"]
    metrics_path = os.path.join(os.path.dirname(path), "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            return json.load(f).get("compression")
    return None


def check_flags_match(args, arch, path, flag):
    for name in ("network", "depth"):
        given = getattr(args, name)
        if given is not None and given != arch[name]:
            raise UserError(f"--{name} {given} disagrees with {flag} {path}, which holds a "
                            f"{arch['network']}-{arch['depth']}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    check_result_dir(args.result_dir)
    ctx = setup(args.device, args.seed)
    run = StageRun("rl", args.result_dir, ctx)
    if args.resume:
        path, flag = resume_path(args.resume, run), "--resume"
        ckpt = load_checkpoint(path, ("rl",), flag)
        source = ckpt.get("extra", {}).get("source", {})
    else:
        path, flag = source_path(args), "--checkpoint"
        ckpt = load_checkpoint(path, ("prune", "sp"), flag)
        source = {"path": path, "stage": ckpt["stage"]}
    check_flags_match(args, ckpt["arch"], path, flag)
    data = load_data(args, ctx, recorded=ckpt.get("pipeline"), source=f"{flag} {path}", resuming=bool(args.resume))
    if data.num_classes != ckpt["arch"]["num_classes"]:
        raise UserError(f"{flag} {path} classifies {ckpt['arch']['num_classes']} classes, but --data_dir "
                        f"{args.data_dir} holds {data.num_classes}")
    model, ddp = prepare(model_from_checkpoint(ckpt, path, flag), ctx)
    check_batch_shapes(model, data.image_size, data.train.batch_size)
    if "compression" not in source:
        source["compression"] = source_compression(ckpt, path, count_params(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    scheduler = make_scheduler(optimizer, args.scheduler, args.epochs, len(data.train))
    baseline = Baseline(args.baseline, model.num_switches, args.baseline_momentum, ctx.device)
    start = 0
    if args.resume:
        start = restore_training_state(ckpt, optimizer, scheduler)
        baseline.load_state_dict(ckpt.get("extra", {}).get("baseline"))
    costs = measure_costs(model, data.image_size)
    run.open(data.pipeline)
    step = ReinforceStep(costs, args.alpha, args.gamma, args.rl_weight, baseline)
    payload = lambda e: {"args": vars(args), "extra": {"baseline": baseline.state_dict(), "source": source}}
    run.fit(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, step_fn=step,
            epochs=args.epochs, start_epoch=start, costs=costs, payload=payload)
    run.finish(model, ddp, data, costs, {
        "source_stage": source.get("stage"), "source_checkpoint": source.get("path"),
        "compression": source.get("compression"), "alpha": args.alpha, "gamma": args.gamma,
        "rl_weight": args.rl_weight, "baseline": args.baseline})
    if ctx.is_main:
        print(f"\n{write_table(args.result_dir)}", end="", flush=True)
        print(f"-> {os.path.join(args.result_dir, 'table.md')} and table.json", flush=True)
    teardown()


if __name__ == "__main__":
    run_main(main)
