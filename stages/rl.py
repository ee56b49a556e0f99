"""Stage 3: dynamic pruning. The switches of the stage-2 network (or of the stage-1 network, for dynamic
pruning alone) learn to skip blocks per image, by the --controller (counterfactual, reinforce or gumbel);
alpha is the price of running every gated block, in cross-entropy units, under all three, adapted during
training with --target_gflops G so that the greedy routes cost G. The stage ends like stage 2: BN statistics
re-estimated under the greedy routes, save, then the final test of the model exactly as saved. Writes
<result_dir>/rl/{checkpoint.pt, metrics.json, tb/}: the row "static + dynamic pruning", then the whole table
as <result_dir>/table.md and table.json. How it trains and ends: docs/stages.md."""
import dataclasses
import os
import sys

from gates.counterfactual import CounterfactualStep
from gates.ending import end_training, small_cut_warning
from gates.gumbel import GumbelStep
from gates.optim import make_optimizer
from gates.policy import BASELINES, Baseline, ReinforceStep
from gates.price import SkipPrice
from models.resnet import compile_report, compile_step
from runtime.checkpoint import model_from_checkpoint
from runtime.loop import make_scheduler, prepare
from runtime.stage import StageRun, check_batch_shapes, resume, restore_training_state, starting_checkpoint
from runtime.table import write_table
from utils.cli import NULL, Setting, StageSettings, check, in_range, like
from utils.data import DataSettings, load_data
from utils.dist import teardown
from utils.errors import UserError
from utils.flops import compression, count_params, from_gflops, gflops_bounds, measure_costs
from utils.nets import unwrap

CONTROLLERS = ("counterfactual", "reinforce", "gumbel")
TITLES = {"data": "data", "training": "training",
          "model": "model (taken from the checkpoint; flags given must agree with it)",
          "switch training": "switch training", "switch optimisation": "switch optimisation"}


@dataclasses.dataclass
class RLSettings(StageSettings):
    epochs: int = like(StageSettings, "epochs", 100)  # the original stage-3 command's
    lr: float = like(StageSettings, "lr", 0.001)
    bs: int = like(StageSettings, "bs", 256)
    network: str = Setting((str, NULL), "if given, must be the checkpoint's network (resnet)", group="model")(None)
    depth: int = Setting((int, NULL), "if given, must be the checkpoint's depth", group="model")(None)
    width: int = Setting((int, NULL), "if given, must be the checkpoint's width multiplier", group="model")(None)
    checkpoint: str = Setting((str, NULL), "stage-2 or stage-1 checkpoint to start from (default: "
                              "<result_dir>/prune/checkpoint.pt if present, else <result_dir>/sp/checkpoint.pt)",
                              group="model", flag={"metavar": "PATH"})(None)
    controller: str = Setting((str,), "how the switches learn: counterfactual (default: per image and block, the "
                              "loss with the block skipped minus with it executed, against the block's price; "
                              "gates/counterfactual.py), reinforce (SkipNet's policy gradient, gates/policy.py) or "
                              "gumbel (ConvNet-AIG's gates: backbone and switches trained together on the "
                              "switches' own routes through straight-through Gumbel-softmax decisions; "
                              "gates/gumbel.py)", choices=CONTROLLERS, group="switch training")("counterfactual")
    tau: float = Setting((float,), "counterfactual: temperature of the switches' targets sigmoid((benefit - price) / "
                         "tau), in cross-entropy units", in_range(0, lo_open=True), group="switch training")(0.05)
    explore_bound: float = Setting((float,), "counterfactual: the training routes are drawn from p clamped to "
                                   "[b, 1 - b]", in_range(0, 0.5), group="switch training")(0.1)
    gumbel_tau: float = Setting((float,), "gumbel: temperature of the Gumbel-softmax relaxation whose gradient the "
                                "decisions pass (1, as in ConvNet-AIG)", in_range(0, lo_open=True),
                                group="switch training")(1.0)
    flip_blocks: int = Setting((int,), "counterfactual: gated blocks whose flip is evaluated per step, K drawn at "
                               "random per step and their terms weighed by (gated blocks) / K, an unbiased estimate "
                               "of the full switch loss at a fraction of its cost (docs/speed.md); 0: every block, "
                               "the full form", in_range(0), group="switch training", flag={"metavar": "K"})(4)
    alpha: float = Setting((float,), "price of running every gated block, per image, in cross-entropy units "
                           "(reinforce: the total reward for skipping them all); with --target_gflops, its "
                           "starting value", in_range(0), group="switch training")(0.1)
    gamma: float = Setting((float,), "reinforce: discount of the returns, in [0, 1]",
                           in_range(0, 1, hi_open=False), group="switch training")(1.0)
    rl_weight: float = Setting((float,), "weight of the switches' loss (reinforce: the policy loss; counterfactual: "
                               "the switch loss; gumbel has none, its price being part of its one loss) beside the "
                               "CE (itself averaged over the batch); the switches' loss is SUMMED over the images of "
                               "a process's batch, as in SkipNet's code (action.reinforce(rl_weight * R) per "
                               "sampled action)", in_range(0), group="switch training")(0.1)
    target_gflops: float = Setting((float, NULL), "GFLOPs per image that the greedy routes must cost: alpha is "
                                   "adapted by dual ascent during training, then the switches' threshold is "
                                   "calibrated on training data", in_range(0, lo_open=True), group="switch training",
                                   flag={"metavar": "G"})(None)
    alpha_lr: float = Setting((float,), "step of the dual ascent on log alpha per training step (with "
                              "--target_gflops)", in_range(0, lo_open=True), group="switch training")(0.05)
    route_epochs: int = Setting((int,), "after the last epoch (and, with --target_gflops, the threshold "
                                "calibration): epochs of fine-tuning the backbone by cross-entropy on the greedy "
                                "routes, the switches' weights not stepped and their decisions passing no gradient, "
                                "so that it learns the routes the deployed model runs (training ran on sampled "
                                "ones, and the calibration moves them); with --target_gflops the threshold is "
                                "recalibrated before every route epoch; 0: none, as in SkipNet", in_range(0),
                                group="switch training")(0)
    route_lr: float = Setting((float, NULL), "learning rate of that fine-tuning, cosine to 0 (default: --lr / 10)",
                              in_range(0, lo_open=True), group="switch training")(None)
    baseline: str = Setting((str,), "reinforce: per-switch baseline, moving average of the returns or the batch "
                            "mean", choices=BASELINES, group="switch training")("moving")
    baseline_momentum: float = Setting((float,), "reinforce: of the moving-average baseline", in_range(0, 1),
                                       group="switch training")(0.9)


# the settings only some controllers read: given to another controller they would do nothing (a warning)
CONTROLLER_SETTINGS = {"tau": ("counterfactual",), "explore_bound": ("counterfactual",), "gamma": ("reinforce",),
                       "baseline": ("reinforce",), "baseline_momentum": ("reinforce",),
                       "rl_weight": ("counterfactual", "reinforce"), "gumbel_tau": ("gumbel",),
                       "flip_blocks": ("counterfactual",)}


def check_settings(s, flag=lambda name: f"--{name}", suffix=""):
    """UserError (naming the flag: `flag(name)`) for settings stage 3 refuses; warnings for settings that would
    do nothing."""
    check(s, flag, suffix)
    if s.route_lr is not None and not s.route_epochs:
        print(f"warning: {flag('route_lr')} {s.route_lr} does nothing without {flag('route_epochs')}",
              file=sys.stderr, flush=True)
    if s.baseline == "batch" and s.bs < 2 and s.controller == "reinforce":  # the batch baseline is per process
        raise UserError(f"{flag('baseline')} batch needs {flag('bs')} 2 or more (per process): the mean return of "
                        f"a batch of {s.bs} image is that image's own return, so the policy loss would be 0 at "
                        f"every step (use {flag('baseline')} moving){suffix}")
    defaults = {f.name: f.default for f in dataclasses.fields(RLSettings)}
    ignored = [(k, users) for k, users in CONTROLLER_SETTINGS.items()
               if s.controller not in users and getattr(s, k) != defaults[k]]
    if ignored:  # another controller's knobs would silently do nothing
        print("warning: " + "; ".join(f"{flag(k)} {getattr(s, k)} only applies to --controller {' and '.join(users)}"
                                      for k, users in ignored) + f" (this run: --controller {s.controller})",
              file=sys.stderr, flush=True)
    if s.target_gflops is not None and s.alpha <= 0:
        raise UserError(f"{flag('alpha')} {s.alpha}: {flag('target_gflops')} adapts alpha multiplicatively, start "
                        f"it > 0{suffix}")


def controller_step(s, model, ddp, costs, price, baseline, ctx):
    if s.controller == "counterfactual":
        unwrap(ddp).explore_bound = s.explore_bound
        return CounterfactualStep(costs, price, s.tau, s.rl_weight, blocks=s.flip_blocks or None,
                                  scale=ctx.world_size)
    if s.controller == "gumbel":
        model.temperature = s.gumbel_tau
        return GumbelStep(costs, price)
    return ReinforceStep(costs, price, s.gamma, s.rl_weight, baseline, scale=ctx.world_size)


def starting_point(s, run, ctx):
    """(checkpoint, its path, the flag that named it, source {path, stage[, compression]}, parent record)."""
    if s.resume:
        ckpt, path = resume(run, s.resume, ctx, s, source=lambda c: (c.get("extra", {}).get("source") or {}))
        source = ckpt.get("extra", {}).get("source", {})
        return ckpt, path, "--resume", source, None
    path, ckpt, parent = starting_checkpoint(s.checkpoint, s.result_dir, ("prune", "sp"), "--checkpoint", (
        f"no checkpoint to start from: neither {s.result_dir}/prune/checkpoint.pt nor {s.result_dir}/sp/checkpoint.pt "
        f"exists (run main_sp.py and main_prune.py first, or give --checkpoint)"))
    return ckpt, path, "--checkpoint", {"path": path, "stage": ckpt["stage"]}, parent


def run(s: RLSettings):
    """Stage 3 with settings `s` (checked here) -> its metrics (metrics.json's)."""
    check_settings(s)
    stage = StageRun("rl", s)
    ctx = stage.ctx
    ckpt, path, flag, source, parent = starting_point(s, stage, ctx)
    arch = ckpt["arch"]
    for name in ("network", "depth", "width"):
        given = getattr(s, name)
        if given is not None and given != arch.get(name):
            raise UserError(f"--{name} {given} disagrees with {flag} {path}, which holds a "
                            f"{arch['network']}-{arch['depth']} of width {arch.get('width')}")
    data = load_data(DataSettings.of(s), ctx, recorded=ckpt.get("pipeline"), source=f"{flag} {path}",
                     resuming=bool(s.resume))
    if data.num_classes != arch["num_classes"]:
        raise UserError(f"{flag} {path} classifies {arch['num_classes']} classes, but --data_dir "
                        f"{s.data_dir} holds {data.num_classes}")
    if s.baseline == "batch" and s.controller == "reinforce" and data.train.batch_size < 2:
        raise UserError(f"--baseline batch needs 2 or more images per process: --bs {s.bs} over "
                        f"{ctx.world_size} processes gives each {data.train.batch_size} (use --baseline moving, or "
                        f"a larger --bs)")
    model, ddp = prepare(model_from_checkpoint(ckpt, path, flag), ctx)
    check_batch_shapes(model, data.image_size, data.train.batch_size, resize_fixed="pipeline" in ckpt)
    if "compression" not in source:  # of stage 1's parameters: 0 from stage 1, None where stage 2 recorded no size
        stage1 = ckpt.get("params_stage1")
        source["compression"] = 0.0 if ckpt["stage"] == "sp" else (
            compression(count_params(model), stage1) if stage1 else None)
    optimizer = make_optimizer(model, s)
    scheduler = make_scheduler(optimizer, s.scheduler, s.epochs, len(data.train))
    baseline = Baseline(s.baseline, model.num_switches, s.baseline_momentum, ctx.device)
    target = from_gflops(s.target_gflops) if s.target_gflops is not None else None
    price = SkipPrice(s.alpha, target, s.alpha_lr, ctx.device)
    start, ending = 0, {}
    if s.resume:  # the controller's own state too
        start = restore_training_state(ckpt, optimizer, scheduler)
        extra = ckpt.get("extra", {})
        baseline.load_state_dict(extra.get("baseline"))
        price.load_state_dict(extra.get("price"))
        ending = extra.get("ending") or {}
    costs = measure_costs(model, data.image_size)
    low, high = gflops_bounds(costs)  # a target the greedy routes cannot reach is refused before any work
    if s.target_gflops is not None and not low < s.target_gflops < high:
        raise UserError(f"--target_gflops {s.target_gflops} is out of reach: this network costs {low:.4g} "
                        f"GFLOPs per image with every gated block skipped and {high:.4g} with all executed")
    stage.open(data.pipeline, parent=parent, resumed=ckpt if s.resume else None,
               start_step=ckpt.get("tb_step", 0) if not s.resume else 0)
    step = controller_step(s, model, ddp, costs, price, baseline, ctx)
    if s.compile:
        step = compile_step(step, ctx.device)
    own_state = lambda: {"args": dataclasses.asdict(s), "extra": {
        "baseline": baseline.state_dict(), "price": price.state_dict(), "source": source, "ending": ending}}
    stage.fit(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, step_fn=step,
              epochs=s.epochs, start_epoch=start, costs=costs, own_state=own_state)
    if not ending:  # a run resumed after its ending was saved does not redo it
        ending = end_training(ddp, data, ctx, costs, target, s)
        stage.save(model, optimizer, scheduler, s.epochs, own_state())
    alpha_final = price.alpha.item()
    if target is not None:  # alpha moves only towards a target (its curve: rl/train/alpha, an epoch's mean)
        stage.logger.scalars("rl/train", {"alpha_final": alpha_final}, stage.last_step)
    compiled = {"compile": compile_report(step, say=ctx.is_main)} if s.compile else {}
    metrics = stage.finish(model, ddp, data, costs, {**compiled,
        "source_stage": source.get("stage"), "source_checkpoint": source.get("path"),
        "compression": source.get("compression"), "alpha": s.alpha, "alpha_final": alpha_final,
        "target_gflops": s.target_gflops, "gamma": s.gamma, "rl_weight": s.rl_weight,
        "baseline": s.baseline, "controller": s.controller, "ending": ending})
    if ctx.is_main:
        say_table(s, small_cut_warning(ddp, data, costs, metrics["gflops_per_image"], alpha_final))
    teardown()
    return metrics


def say_table(s, warning):
    """The whole table (test numbers only), then the warning of a run that cut next to nothing, last, so that
    it is not lost above the table."""
    if s.final_split == "test":
        print(f"\n{write_table(s.result_dir)}", end="", flush=True)
        print(f"-> {os.path.join(s.result_dir, 'table.md')} and table.json", flush=True)
    else:
        print(f"no table written: the run ended on the {s.final_split} split (--final_split "
              f"{s.final_split}), and the table is of test numbers", flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
