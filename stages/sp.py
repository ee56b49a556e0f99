"""Stage 1: the network and its switches, trained by cross-entropy (--train_mode: joint, hard or open), from
scratch or fine-tuning a dense network (--pretrained); under joint the switches then restart from their
data-dependent spread on the trained network, so that stage 3 finds them where it can move them. Writes
<result_dir>/sp/{checkpoint.pt, metrics.json, tb/}: the row "w/o pruning" = the dense network (every block,
no switch evaluated): test_acc, gflops_per_image; beside it the greedy routes' routed_acc, routed_gflops
and per-switch exec_rate. How it trains: docs/stages.md."""
import dataclasses
import itertools
import sys

import torch

from gates.optim import make_optimizer
from models import build_model, make_arch
from models.resnet import compile_report, compile_step
from models.switches import spread_decisions
from runtime.checkpoint import load_pretrained, model_from_checkpoint
from runtime.loop import make_scheduler, prepare
from runtime.stage import StageRun, check_batch_shapes, check_resume_args, restore_training_state, resume
from runtime.steps import dense_step, supervised_step
from utils.cli import NULL, Setting, StageSettings, check
from utils.data import DataSettings, load_data
from utils.dist import broadcast_tensors, teardown
from utils.errors import UserError
from utils.flops import dense_flops, measure_costs, to_gflops
from utils.lineage import parent_record

LOW_LR = 1e-3  # at or below it, SGD from a random initialisation barely moves in a usual number of epochs
SPREAD_IMAGES = 256  # the switches' data-dependent start measures spreads over this many images, whatever --bs


TITLES = {"data": "data", "training": "training", "model": "model", "switch optimisation": "switch optimisation"}


@dataclasses.dataclass
class SPSettings(StageSettings):
    network: str = Setting((str,), "the network (resnet)", group="model")("resnet")
    depth: int = Setting((int,), "6n+2", group="model")(32)
    width: int = Setting((int,), "stage widths 16k/32k/64k", group="model")(4)
    gate: str = Setting((str,), "switch kind: rnn, ff or any kind registered with models.switches.switch_kind",
                        group="model")("rnn")
    pretrained: str = Setting((str, NULL), "start from these weights (a checkpoint or a state dict; switches may be "
                              "missing)", group="model", flag={"metavar": "PATH"})(None)
    train_mode: str = Setting((str,), "joint: cross-entropy of the dense network plus that of the switches' routes, "
                              "then the switches re-spread on the trained network; hard: SkipNet's supervised phase "
                              "alone (blocks skipped where the switches say so; the dense network is much weaker); "
                              "open: plain dense training, switches untouched (the reference for the dense "
                              "accuracy)", choices=("joint", "hard", "open"), group="model")("joint")
    dense_epochs: int = Setting((int,), "train the first N epochs as a plain dense network (switches untouched), "
                                "then SkipNet's supervised phase: SkipNet starts that phase from a trained ResNet",
                                group="model")(0)


def check_settings(s):
    check(s)
    if s.lr <= LOW_LR and not s.pretrained and not s.resume and s.epochs > 0:
        print(f"warning: --lr {s.lr:g} is a fine-tuning rate, but no --pretrained weights are given: the network "
              f"trains from scratch (use --lr 0.1, or give --pretrained PATH)", file=sys.stderr, flush=True)
    if not 0 <= s.dense_epochs <= s.epochs:
        raise UserError(f"--dense_epochs {s.dense_epochs} must be in [0, --epochs {s.epochs}]")
    make_arch(s.network, s.depth, s.width, 1, s.gate)  # the network's settings checked before any work


def joint_step(model, x, y):
    """Cross-entropy of the dense network (its gradient exactly plain dense training's) plus that of the
    switches' routes (hard mode), which teaches the backbone to tolerate skipping. One backward: DDP reduces once."""
    dense, dense_stats = supervised_step(model, x, y, mode="open")
    routed, routed_stats = supervised_step(model, x, y, mode="hard")
    return dense + routed, {"loss": dense_stats["loss"], "acc": dense_stats["acc"],
                            "routed_loss": routed_stats["loss"], "routed_acc": routed_stats["acc"],
                            "exec_rate": routed_stats["exec_rate"]}


STEPS = {"joint": (joint_step, (("dense", "open"), ("routed", "hard"))),
         "hard": (supervised_step, (("routed", "hard"), ("dense", "open"))),
         "open": (dense_step, (("dense", "open"),))}


def spread_images(loader, n=SPREAD_IMAGES):
    """The first n (or all, if fewer) unaugmented training images of epoch 0, (n, C, H, W): enough for the
    spreads spread_decisions measures, whatever the batch size (a batch of one has no spread)."""
    loader.set_epoch(0)
    return torch.cat([x for x, _ in itertools.islice(loader, -(-n // loader.batch_size))])[:n]


def starting_network(s, arch, ckpt, resume_path, data, ctx):
    """The network stage 1 trains: the resumed run's (its architecture that of the settings), else a new one
    (with the --pretrained weights), its untrained switches spread from their first step."""
    if ckpt:
        differ = [f"{k} {ckpt['arch'].get(k)} vs {v}" for k, v in arch.items() if ckpt["arch"].get(k) != v]
        if differ:
            raise UserError(f"--resume {resume_path}: its network differs from the flags' "
                            f"(checkpoint vs flags: {', '.join(differ)})")
        return model_from_checkpoint(ckpt, resume_path, "--resume")
    model = build_model(arch)
    fresh = [p.clone() for p in model.switches.parameters()]
    if s.pretrained:
        load_pretrained(model, s.pretrained)
    if all(torch.equal(a, b) for a, b in zip(fresh, model.switches.parameters())):  # no trained switches
        # decisions spread around 0.5 from the first step (DDP then copies rank 0's start to every rank)
        spread_decisions(model.to(ctx.device), spread_images(data.plain_train))
    return model


def run(s: SPSettings):
    """Stage 1 with settings `s` (checked here) -> its metrics (metrics.json's)."""
    check_settings(s)
    stage = StageRun("sp", s)
    ctx = stage.ctx
    ckpt, resume_path = resume(stage, s.resume, ctx) if s.resume else (None, None)
    data = load_data(DataSettings.of(s), ctx, recorded=ckpt.get("pipeline") if ckpt else None,
                     source=f"--resume {resume_path}" if ckpt else None, resuming=True)
    if ckpt:  # after the data's own settings, checked against the recorded pipeline with their own messages
        check_resume_args(ckpt, s, resume_path)
    arch = make_arch(s.network, s.depth, s.width, data.num_classes, s.gate)
    model, ddp = prepare(starting_network(s, arch, ckpt, resume_path, data, ctx), ctx)
    check_batch_shapes(model, data.image_size, data.train.batch_size)
    optimizer = make_optimizer(model, s)
    scheduler = make_scheduler(optimizer, s.scheduler, s.epochs, len(data.train))
    start = restore_training_state(ckpt, optimizer, scheduler) if ckpt else 0
    costs = measure_costs(model, data.image_size)
    parent = parent_record("pretrained", s.pretrained) if s.pretrained and not ckpt else None
    stage.open(data.pipeline, parent=parent, resumed=ckpt)
    if s.epochs == 0 and not ckpt and ctx.is_main:
        weights = "the --pretrained weights" if s.pretrained else "its random initialisation"
        print(f"warning: --epochs 0 trains nothing: sp/checkpoint.pt will hold the network as it starts "
              f"({weights})", file=sys.stderr, flush=True)
    # done once, after the last epoch (again if a resumed run trains further epochs)
    respread = [bool((ckpt or {}).get("switches_respread")) and start >= s.epochs]
    own_state = lambda: {"args": dataclasses.asdict(s), "switches_respread": respread[0]}
    common = dict(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, costs=costs,
                  own_state=own_state, total_epochs=s.epochs)
    compiled = (lambda fn: compile_step(fn, ctx.device)) if s.compile else (lambda fn: fn)
    if start < s.dense_epochs:  # the network being trained is the dense one: evaluated as such
        stage.fit(step_fn=compiled(dense_step), epochs=s.dense_epochs, start_epoch=start,
                  evals=(("dense", "open"),), **common)
    step, evals = STEPS[s.train_mode]
    step = compiled(step)  # kept: what torch.compile did goes into the metrics
    stage.fit(step_fn=step, epochs=s.epochs, start_epoch=max(start, s.dense_epochs), evals=evals, **common)
    if s.train_mode == "joint" and not respread[0]:
        # trained with the dense network beside them, the switches end up executing nearly every block
        # (p ~ 1, where REINFORCE's push p(1-p) vanishes); spread them again on the trained features
        spread_decisions(model, spread_images(data.plain_train))
        broadcast_tensors(list(model.switches.parameters()))  # rank 0's spread, on every rank
        respread[0] = True
        stage.save(model, optimizer, scheduler, s.epochs, own_state())
    # the routes beside row 1 are those of the switches as saved: re-spread ones are named so in TensorBoard,
    # where they follow the curve of the routes trained before
    extra = {"dense_gflops": to_gflops(dense_flops(costs)), "train_mode": s.train_mode,
             "switches_respread": respread[0]}
    if s.compile:
        extra["compile"] = compile_report(step, say=ctx.is_main)
    metrics = stage.finish(model, ddp, data, costs, extra, mode="open",
                           routes="respread_routed" if respread[0] else "routed")
    teardown()
    return metrics
