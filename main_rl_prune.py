"""Stage 3: dynamic pruning. The switches of the stage-2 network (or of the stage-1 network, for dynamic
pruning alone) learn to skip blocks per image. The controller (--controller):
  counterfactual (default; gates/counterfactual.py): per image and block, the loss with the block skipped
      minus with it executed, against the block's price; the backbone learns by cross-entropy on routes
      drawn from the switches' probabilities kept away from 0 and 1
  reinforce (gates/policy.py): SkipNet's REINFORCE, the backbone by cross-entropy on the sampled routes
  gumbel (gates/gumbel.py): ConvNet-AIG's gates, the backbone and the switches trained together on the
      switches' own routes by the cross-entropy plus the price of the blocks run, through the decisions'
      straight-through Gumbel-softmax gradient
alpha is the price of running every gated block, in cross-entropy units, under all three. The switches'
loss of counterfactual and reinforce is summed over the images of each process's batch (every decision gets
its own term), so --rl_weight means what it means in SkipNet's code, where the original flags come from.
With --target_gflops G, alpha is adapted during training (dual ascent) and the switches' threshold
calibrated on training data so that the greedy routes cost G.
With --route_epochs N the backbone is then fine-tuned for N epochs by cross-entropy on the greedy routes
(the switches' weights not stepped, their decisions passing no gradient; with --target_gflops the threshold
is recalibrated before every route epoch). The stage ends like stage 2: BN statistics re-estimated under the
greedy routes, save, then the final test of the model exactly as saved; a run whose switches cut under 1%
of the GFLOPs ends with a line saying so and which --alpha or --target_gflops would cut more. Writes
<result_dir>/rl/{checkpoint.pt, metrics.json, tb/}: the row "static + dynamic pruning", then the whole table
as <result_dir>/table.md and table.json."""
import os
import sys

from gates.counterfactual import CounterfactualStep
from gates.ending import end_training, small_cut_warning
from gates.gumbel import GumbelStep
from gates.optim import add_switch_flags, check_switch_flags, make_optimizer
from gates.policy import BASELINES, Baseline, ReinforceStep
from gates.price import SkipPrice
from models.resnet import compile_report, compile_step
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import base_parser, check_ranges
from utils.dist import setup, teardown
from runtime.loop import make_scheduler, prepare
from utils.errors import UserError, run_main
from utils.lineage import check_chain, check_parent_fits, guard_rerun, parent_record
from utils.flops import compression, count_params, from_gflops, gflops_bounds, measure_costs
from runtime.stage import (StageRun, check_batch_shapes, check_result_dir, check_resume_args, check_resume_world_size,
                           restore_training_state, resume_path)
from utils.data import DataSettings, load_data
from utils.nets import unwrap
from runtime.table import write_table


CONTROLLERS = ("counterfactual", "reinforce", "gumbel")
# the flags that only some controllers read, and their defaults: given to another controller they would do
# nothing, which a warning says
CONTROLLER_FLAGS = {"tau": (("counterfactual",), 0.05), "explore_bound": (("counterfactual",), 0.1),
                    "gamma": (("reinforce",), 1.0), "baseline": (("reinforce",), "moving"),
                    "baseline_momentum": (("reinforce",), 0.9),
                    "rl_weight": (("counterfactual", "reinforce"), 0.1), "gumbel_tau": (("gumbel",), 1.0),
                    "flip_blocks": (("counterfactual",), 4)}
# The counterfactual's gated blocks flipped per step (0: all): 4 sampled ones cost half the full form's step
# at the same validation accuracy (docs/speed.md)
FLIP_BLOCKS = CONTROLLER_FLAGS["flip_blocks"][1]


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.set_defaults(epochs=100, lr=0.001, bs=256)  # the original stage-3 command
    m = p.add_argument_group("model (taken from the checkpoint; flags given must agree with it)")
    m.add_argument("--network", default=None, help="if given, must be the checkpoint's network (resnet)")
    m.add_argument("--depth", type=int, default=None, help="if given, must be the checkpoint's depth")
    m.add_argument("--width", type=int, default=None, help="if given, must be the checkpoint's width multiplier")
    m.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="stage-2 or stage-1 checkpoint to start from (default: <result_dir>/prune/checkpoint.pt "
                        "if present, else <result_dir>/sp/checkpoint.pt)")
    r = p.add_argument_group("switch training")
    r.add_argument("--controller", default="counterfactual", choices=CONTROLLERS,
                   help="how the switches learn: counterfactual (default: per image and block, the loss with "
                        "the block skipped minus with it executed, against the block's price; "
                        "gates/counterfactual.py), reinforce (SkipNet's policy gradient, gates/policy.py) or "
                        "gumbel (ConvNet-AIG's gates: backbone and switches trained together on the switches' "
                        "own routes through straight-through Gumbel-softmax decisions; gates/gumbel.py)")
    r.add_argument("--tau", type=float, default=0.05,
                   help="counterfactual: temperature of the switches' targets sigmoid((benefit - price) / tau), "
                        "in cross-entropy units")
    r.add_argument("--explore_bound", type=float, default=0.1,
                   help="counterfactual: the training routes are drawn from p clamped to [b, 1 - b]")
    r.add_argument("--gumbel_tau", type=float, default=1.0,
                   help="gumbel: temperature of the Gumbel-softmax relaxation whose gradient the decisions pass "
                        "(1, as in ConvNet-AIG)")
    r.add_argument("--flip_blocks", type=int, default=FLIP_BLOCKS, metavar="K",
                   help="counterfactual: gated blocks whose flip is evaluated per step, K drawn at random per step "
                        "and their terms weighed by (gated blocks) / K, an unbiased estimate of the full switch "
                        "loss at a fraction of its cost (docs/speed.md); 0: every block, the full form")
    r.add_argument("--alpha", type=float, default=0.1,
                   help="price of running every gated block, per image, in cross-entropy units (reinforce: the "
                        "total reward for skipping them all); with --target_gflops, its starting value")
    r.add_argument("--gamma", type=float, default=1.0, help="reinforce: discount of the returns, in [0, 1]")
    r.add_argument("--rl_weight", type=float, default=0.1,
                   help="weight of the switches' loss (reinforce: the policy loss; counterfactual: the switch "
                        "loss; gumbel has none, its price being part of its one loss) beside the CE (itself "
                        "averaged over the batch); the switches' loss is SUMMED over the images of a process's "
                        "batch, as in SkipNet's code (action.reinforce(rl_weight * R) per sampled action)")
    r.add_argument("--target_gflops", type=float, default=None, metavar="G",
                   help="GFLOPs per image that the greedy routes must cost: alpha is adapted by dual ascent "
                        "during training, then the switches' threshold is calibrated on training data")
    r.add_argument("--alpha_lr", type=float, default=0.05,
                   help="step of the dual ascent on log alpha per training step (with --target_gflops)")
    r.add_argument("--route_epochs", type=int, default=0,
                   help="after the last epoch (and, with --target_gflops, the threshold calibration): epochs of "
                        "fine-tuning the backbone by cross-entropy on the greedy routes, the switches' weights "
                        "not stepped and their decisions passing no gradient, so that it learns the routes the "
                        "deployed model runs (training ran on sampled ones, and the calibration moves them); "
                        "with --target_gflops the threshold is recalibrated before every route epoch; 0: none, "
                        "as in SkipNet")
    r.add_argument("--route_lr", type=float, default=None,
                   help="learning rate of that fine-tuning, cosine to 0 (default: --lr / 10)")
    r.add_argument("--baseline", default="moving", choices=BASELINES,
                   help="reinforce: per-switch baseline, moving average of the returns or the batch mean")
    r.add_argument("--baseline_momentum", type=float, default=0.9, help="reinforce: of the moving-average baseline")
    add_switch_flags(p)
    return p.parse_args(argv)


def check_args(args):
    check_ranges(args)
    for name, ok, why in [("alpha", args.alpha >= 0, "must be >= 0"), ("gamma", 0 <= args.gamma <= 1, "must be in [0, 1]"),
                          ("rl_weight", args.rl_weight >= 0, "must be >= 0"),
                          ("baseline_momentum", 0 <= args.baseline_momentum < 1, "must be in [0, 1)"),
                          ("target_gflops", args.target_gflops is None or args.target_gflops > 0, "must be > 0"),
                          ("alpha_lr", args.alpha_lr > 0, "must be > 0"),
                          ("route_epochs", args.route_epochs >= 0, "must be >= 0"),
                          ("route_lr", args.route_lr is None or args.route_lr > 0, "must be > 0"),
                          ("tau", args.tau > 0, "must be > 0"), ("gumbel_tau", args.gumbel_tau > 0, "must be > 0"),
                          ("flip_blocks", args.flip_blocks >= 0, "must be >= 0"),
                          ("explore_bound", 0 <= args.explore_bound < 0.5, "must be in [0, 0.5)")]:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name)} {why}")
    if args.route_lr is not None and not args.route_epochs:
        print(f"warning: --route_lr {args.route_lr} does nothing without --route_epochs", file=sys.stderr,
              flush=True)
    if args.baseline == "batch" and args.bs < 2 and args.controller == "reinforce":  # the batch baseline is per process
        raise UserError(f"--baseline batch needs --bs 2 or more (per process): the mean return of a batch of "
                        f"{args.bs} image is that image's own return, so the policy loss would be 0 at every "
                        f"step (use --baseline moving)")
    ignored = [(k, users) for k, (users, default) in CONTROLLER_FLAGS.items()
               if args.controller not in users and getattr(args, k) != default]
    if ignored:  # another controller's knobs would silently do nothing
        print("warning: " + "; ".join(f"--{k} {getattr(args, k)} only applies to --controller {' and '.join(users)}"
                                      for k, users in ignored) + f" (this run: --controller {args.controller})",
              file=sys.stderr, flush=True)
    if args.target_gflops is not None and args.alpha <= 0:
        raise UserError(f"--alpha {args.alpha}: --target_gflops adapts alpha multiplicatively, start it > 0")
    check_switch_flags(args)


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


def source_compression(ckpt, params):
    """Fraction of the stage-1 parameters that the starting network (holding `params`) has removed: 0 for a
    stage-1 network, from the stage-1 size a stage-2 one records (None where it records none)."""
    if ckpt["stage"] == "sp":
        return 0.0
    return compression(params, ckpt["params_stage1"]) if ckpt.get("params_stage1") else None


def check_flags_match(args, arch, path, flag):
    for name in ("network", "depth", "width"):
        given = getattr(args, name)
        if given is not None and given != arch.get(name):
            raise UserError(f"--{name} {given} disagrees with {flag} {path}, which holds a "
                            f"{arch['network']}-{arch['depth']} of width {arch.get('width')}")


def check_target(args, costs):
    """A --target_gflops the greedy routes cannot reach (below the cost with every gated block skipped, or
    above the cost with all executed) is refused before any work."""
    if args.target_gflops is None:
        return
    low, high = gflops_bounds(costs)
    if not low < args.target_gflops < high:
        raise UserError(f"--target_gflops {args.target_gflops} is out of reach: this network costs {low:.4g} "
                        f"GFLOPs per image with every gated block skipped and {high:.4g} with all executed")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    check_result_dir(args.result_dir)
    ctx = setup(args.device, args.seed, args.amp, args.channels_last, args.tf32)
    run = StageRun("rl", args.result_dir, ctx)
    if args.resume:
        path, flag = resume_path(args.resume, run), "--resume"
        ckpt = load_checkpoint(path, ("rl",), flag)
        check_resume_args(ckpt, args, path)
        check_resume_world_size(ckpt, ctx, path)
        source = ckpt.get("extra", {}).get("source", {})
    else:
        path, flag = source_path(args), "--checkpoint"
        if not args.checkpoint:  # the network of this --result_dir's chain, which must hold
            check_chain(args.result_dir, ("sp", "prune"))
        ckpt = load_checkpoint(path, ("prune", "sp"), flag)
        source = {"path": path, "stage": ckpt["stage"]}
    parent = parent_record(source.get("stage"), source["path"]) if not args.resume else None
    if parent and args.checkpoint:
        check_parent_fits(args.result_dir, parent, "--checkpoint")
    if args.resume and os.path.isfile(source.get("path", "")):
        began_from = (ckpt.get("parent") or {}).get("sha256")
        if began_from and began_from != parent_record(source["stage"], source["path"])["sha256"]:
            raise UserError(f"--resume {path}: began from another network than {source['path']} holds now (an "
                            f"earlier stage was rerun since); start stage 3 afresh")
    check_flags_match(args, ckpt["arch"], path, flag)
    data = load_data(DataSettings.of(args), ctx, recorded=ckpt.get("pipeline"), source=f"{flag} {path}", resuming=bool(args.resume))
    if data.num_classes != ckpt["arch"]["num_classes"]:
        raise UserError(f"{flag} {path} classifies {ckpt['arch']['num_classes']} classes, but --data_dir "
                        f"{args.data_dir} holds {data.num_classes}")
    if args.baseline == "batch" and args.controller == "reinforce" and data.train.batch_size < 2:
        raise UserError(f"--baseline batch needs 2 or more images per process: --bs {args.bs} over "
                        f"{ctx.world_size} processes gives each {data.train.batch_size} (use --baseline moving, or "
                        f"a larger --bs)")
    model, ddp = prepare(model_from_checkpoint(ckpt, path, flag), ctx)
    check_batch_shapes(model, data.image_size, data.train.batch_size, resize_fixed="pipeline" in ckpt)
    if "compression" not in source:
        source["compression"] = source_compression(ckpt, count_params(model))
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args.scheduler, args.epochs, len(data.train))
    baseline = Baseline(args.baseline, model.num_switches, args.baseline_momentum, ctx.device)
    target = from_gflops(args.target_gflops) if args.target_gflops is not None else None
    price = SkipPrice(args.alpha, target, args.alpha_lr, ctx.device)
    start, ending = 0, {}
    if args.resume:
        start = restore_training_state(ckpt, optimizer, scheduler)
        extra = ckpt.get("extra", {})
        baseline.load_state_dict(extra.get("baseline"))
        price.load_state_dict(extra.get("price"))
        ending = extra.get("ending") or {}
    costs = measure_costs(model, data.image_size)
    check_target(args, costs)
    guard_rerun(args.result_dir, "rl", args.overwrite, ctx.is_main, resuming=bool(args.resume))
    run.open(data.pipeline, parent=parent, resumed=ckpt if args.resume else None,
             start_step=ckpt.get("tb_step", 0) if not args.resume else 0)
    if args.controller == "counterfactual":
        unwrap(ddp).explore_bound = args.explore_bound
        step = CounterfactualStep(costs, price, args.tau, args.rl_weight, blocks=args.flip_blocks or None,
                                  scale=ctx.world_size)
    elif args.controller == "gumbel":
        model.temperature = args.gumbel_tau
        step = GumbelStep(costs, price)
    else:
        step = ReinforceStep(costs, price, args.gamma, args.rl_weight, baseline, scale=ctx.world_size)
    if args.compile:
        step = compile_step(step, ctx.device)
    own_state = lambda: {"args": vars(args), "extra": {"baseline": baseline.state_dict(), "price": price.state_dict(),
                                                         "source": source, "ending": ending}}
    run.fit(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, step_fn=step,
            epochs=args.epochs, start_epoch=start, costs=costs, own_state=own_state)
    if not ending:  # a run resumed after its ending was saved does not redo it
        ending = end_training(ddp, data, ctx, costs, target, args)
        run.save(model, optimizer, scheduler, args.epochs, own_state())
    alpha_final = price.alpha.item()
    if target is not None:  # alpha moves only towards a target (its curve: rl/train/alpha, an epoch's mean)
        run.logger.scalars("rl/train", {"alpha_final": alpha_final}, run.last_step)
    compiled = {"compile": compile_report(step, say=ctx.is_main)} if args.compile else {}
    metrics = run.finish(model, ddp, data, costs, {**compiled,
        "source_stage": source.get("stage"), "source_checkpoint": source.get("path"),
        "compression": source.get("compression"), "alpha": args.alpha, "alpha_final": alpha_final,
        "target_gflops": args.target_gflops, "gamma": args.gamma, "rl_weight": args.rl_weight,
        "baseline": args.baseline, "controller": args.controller, "ending": ending})
    if ctx.is_main and args.final_split == "test":  # the table holds test numbers only
        print(f"\n{write_table(args.result_dir)}", end="", flush=True)
        print(f"-> {os.path.join(args.result_dir, 'table.md')} and table.json", flush=True)
    elif ctx.is_main:
        print(f"no table written: the run ended on the {args.final_split} split (--final_split "
              f"{args.final_split}), and the table is of test numbers", flush=True)
    if ctx.is_main:  # last, so that it is not lost above the table
        warning = small_cut_warning(ddp, data, costs, metrics["gflops_per_image"], alpha_final)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    teardown()


if __name__ == "__main__":
    run_main(main)
