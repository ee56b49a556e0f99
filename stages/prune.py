"""Stage 2: prune the stage-1 network in the Kronecker-factored eigenbasis (EigenDamage), then fine-tune ->
<result_dir>/prune/: the row "static pruning only". Its settings: pruners/config.py's PruneSettings."""
import dataclasses
import os
import sys
import time

import torch

from pruners import check_schedule, evenly_spaced, prunable_convs, prune, set_rotations_trainable
from pruners.config import PruneSettings
from runtime.checkpoint import model_from_checkpoint
from runtime.evaluate import evaluate, recalibrate_bn
from runtime.loop import make_scheduler, prepare, sgd
from runtime.stage import StageRun, check_batch_shapes, restore_training_state, resume, starting_checkpoint
from runtime.steps import dense_step, supervised_step
from utils.data import DataSettings, load_data
from utils.dist import exact_fp32, teardown
from utils.errors import UserError
from utils.flops import compression, count_params, dense_flops, measure_costs, to_gflops


def check_resumable(ckpt, schedule, path):
    """The rounds a checkpoint has pruned (all before its round, and its round) must be the config's; later
    rounds may have been changed since (a target found out of reach, say)."""
    done = ckpt["round"] + 1
    pruned, planned = ([(r["target"], r["value"]) for r in rounds[:done]] for rounds in (ckpt["schedule"], schedule))
    if pruned != planned:
        raise UserError(f"--resume {path}: the {done} round(s) it has pruned had targets {pruned}, the config's "
                        f"first {done} are {planned}; only rounds not yet begun may change")
    now, then = schedule[done - 1], ckpt["schedule"][done - 1]
    if (now["epochs"], now["lr"]) != (then["epochs"], then["lr"]):
        raise UserError(f"--resume {path}: round {done} is under way with epochs {then['epochs']} and lr "
                        f"{then['lr']}; the config now says {now['epochs']} and {now['lr']}")


def prune_round(model, data, ctx, cfg, spec, r, params_stage1):
    """Steps 1-6 of stage 2 (pruners/__init__.py) on `model`; returns the rebuilt model (on the device) and the round's
    report, with the evaluation of the pruned net before any fine-tuning."""
    torch.manual_seed(cfg.seed * 1_000_003 + r)  # the labels the true Fisher samples
    with exact_fp32():  # the Kronecker factors and their eigenbases in float32 whatever "tf32" allows in training
        model, report = prune(
            model.to(ctx.device), evenly_spaced(data.plain_train, cfg.fisher_batches), target=spec["target"],
            value=spec["value"], params_reference=params_stage1, limit=cfg.prune_ratio_limit,
            damping=cfg.damping, fisher_type=cfg.fisher_type, criterion=cfg.criterion,
            round_to=cfg.round_to, image_size=data.image_size,
            num_batches=min(cfg.fisher_batches, len(data.plain_train)), progress=ctx.is_main, mode=cfg.mode)
    before = evaluate(model, data.eval, ctx, measure_costs(model, data.image_size), mode="open",
                      desc=f"{data.eval_name} after pruning")
    report.update({f"{data.eval_name}_acc_before_finetune": before["acc"],
                   f"{data.eval_name}_loss_before_finetune": before["loss"]})
    if ctx.is_main:
        print(f"[prune] round {r + 1}: {spec['target']} {spec['value']} -> cut {report['ratio']:.3f} of "
              f"{report['directions']} directions, {report['params'] / 1e6:.3f} M params (compression "
              f"{report['compression']:.3f}), {report['gflops']:.4g} GFLOPs, {len(model.arch['ranks'])} convs "
              f"factored; {data.eval_name} acc "
              f"{before['acc']:.2f}% before fine-tuning; factor pass {report['factor_seconds']:.1f}s, eigh "
              f"{report['eigen_seconds']:.1f}s", flush=True)
        if report["directions_cut"] == 0:
            # not "unchanged": the round still fine-tunes and re-estimates the BN statistics, which move the outputs
            changes = (f"the fine-tuning ({spec['epochs']} epochs) and the BatchNorm statistics re-estimated after "
                       f"it" if spec["epochs"] else "the BatchNorm statistics re-estimated at the round's end")
            print(f"warning: round {r + 1}: {spec['target']} {spec['value']} removes nothing (the directions under "
                  f"the threshold are kept by prune_ratio_limit or lie in layers whose factored form would not "
                  f"be smaller): every layer keeps its shape; only {changes} change the network's outputs",
                  file=sys.stderr, flush=True)
    return model, report


def finetune(stage, model, data, ctx, cfg, spec, own_state, report, resumed, log_offset, total_epochs):
    """Fine-tune the pruned `model` for the round (continuing `resumed` when it was under way), then re-estimate
    its BN statistics and save -> (model, ddp, costs)."""
    if cfg.mode == "open":  # the static network: every block, the switches untouched
        step, evals = dense_step, (("dense", "open"),)
    else:
        step, evals = supervised_step, (("dense", "open"), ("routed", "hard"))
    set_rotations_trainable(model, not cfg.fix_rotation)
    model, ddp = prepare(model, ctx)
    optimizer = sgd([p for p in model.parameters() if p.requires_grad], spec["lr"], cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.scheduler, spec["epochs"], len(data.train))
    costs = measure_costs(model, data.image_size)
    save = lambda epoch: stage.save(model, optimizer, scheduler, epoch, own_state())
    start = restore_training_state(resumed, optimizer, scheduler) if resumed else 0
    if not resumed:
        save(0)  # right after pruning: --resume continues the fine-tuning from here
    stage.fit(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, step_fn=step,
              epochs=spec["epochs"], start_epoch=start, costs=costs, own_state=own_state, log_offset=log_offset,
              evals=evals, total_epochs=total_epochs)
    t0 = time.perf_counter()
    # One epoch of shuffled, augmented training batches in the mode the weights were trained in: the
    # statistics they were trained under, over every training image.
    recalibrate_bn(ddp, data.train, ctx, mode=cfg.mode, batches=len(data.train))
    report["bn_seconds"] = time.perf_counter() - t0
    save(spec["epochs"])  # with the re-estimated BN statistics that the next round and the metrics use
    return model, ddp, costs


def run(cfg: PruneSettings):
    """Stage 2 with settings `cfg` (a validated config: pruners.config.validate / load_config) -> its metrics."""
    schedule = cfg.schedule
    stage = StageRun("prune", cfg)
    ctx = stage.ctx
    stage1_path, stage1, parent = starting_checkpoint(cfg.checkpoint, cfg.result_dir, ("sp",), "checkpoint", (
        f"no stage-1 checkpoint at {os.path.join(cfg.result_dir, 'sp', 'checkpoint.pt')}: run main_sp.py with this "
        f"result_dir first (or set the config's 'checkpoint')"))
    ckpt, resume_path = None, None
    if cfg.resume:
        ckpt, resume_path = resume(stage, cfg.resume, ctx, source=lambda c: {"stage": "sp", "path": stage1_path})
        if not {"round", "history", "schedule"} <= set(ckpt):
            raise UserError(f"--resume {resume_path}: lacks the pruning state (round, history, schedule)")
        check_resumable(ckpt, schedule, resume_path)
    # a resumed run inherited stage 1's pipeline and fixed its own augmentation
    recorded = (ckpt or stage1).get("pipeline")
    source = f"--resume {resume_path}" if ckpt else f"checkpoint {stage1_path}"
    data = load_data(DataSettings.of(cfg), ctx, recorded=recorded, source=source, resuming=bool(ckpt))
    if stage1["arch"]["num_classes"] != data.num_classes:
        raise UserError(f"checkpoint {stage1_path}: its network has {stage1['arch']['num_classes']} classes, "
                        f"data_dir {cfg.data_dir} holds {data.num_classes}")
    model = model_from_checkpoint(stage1, stage1_path, "checkpoint")
    params_stage1 = count_params(model)
    check_batch_shapes(model, data.image_size, data.train.batch_size, resize_fixed=recorded is not None)
    if ckpt:
        model = model_from_checkpoint(ckpt, resume_path, "--resume")
    first_round, history = (ckpt["round"], ckpt["history"]) if ckpt else (0, [])
    # every round still to prune, checked before any work (the resumed round is pruned already)
    later = first_round + 1 if ckpt else 0
    check_schedule(model, schedule[later:], cfg.prune_ratio_limit, params_stage1, first_round=later,
                   image_size=data.image_size, round_to=cfg.round_to)
    stage.open(data.pipeline, parent=parent, resumed=ckpt, start_step=stage1.get("tb_step", 0))

    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "overwrite"}  # what a checkpoint records
    logged = sum(spec["epochs"] for spec in schedule[:first_round])  # TensorBoard steps of earlier rounds
    total_epochs = sum(spec["epochs"] for spec in schedule)
    for r in range(first_round, len(schedule)):
        spec, resuming = schedule[r], ckpt is not None and r == first_round
        if not resuming:
            model, report = prune_round(model, data, ctx, cfg, spec, r, params_stage1)
            history.append(report)
            stage.logger.scalars("prune/round", {k: report[k] for k in ("compression", "params", "gflops")},
                                 stage.step_offset + logged)
        own_state = lambda r=r: {"round": r, "history": history, "schedule": schedule, "config": config,
                                 "params_stage1": params_stage1, "stage1_checkpoint": stage1_path}
        model, ddp, costs = finetune(stage, model, data, ctx, cfg, spec, own_state, history[-1],
                                     ckpt if resuming else None, logged, total_epochs)
        logged += spec["epochs"]

    metrics = stage.finish(model, ddp, data, costs, mode="open", extra={"mode": cfg.mode,
        "params_stage1": params_stage1, "compression": compression(count_params(model), params_stage1),
        "dense_gflops": to_gflops(dense_flops(costs)), "ranks": model.arch["ranks"],
        "layers_unpruned": [n for n in prunable_convs(model) if n not in model.arch["ranks"]], "rounds": history,
        "stage1_checkpoint": stage1_path})
    teardown()
    return metrics
