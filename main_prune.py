"""Stage 2: prune the stage-1 network in the Kronecker-factored eigenbasis (EigenDamage), then fine-tune.

    python main_prune.py --config_path config.json [--resume [PATH]] [--result_dir DIR] [--data_dir DIR]
                         [--device DEV] [--checkpoint PATH] [--set KEY=VALUE ...] [--overwrite]

Reads the stage-1 checkpoint (the config's `checkpoint`, default <result_dir>/sp/checkpoint.pt) and writes
<result_dir>/prune/{checkpoint.pt, metrics.json, tb/}: the row "static pruning only". The config keys are
described in pruners/config.py; the command-line flags override the keys of the same name.
"""
import json
import os
import sys
import time

import torch

from pruners import check_schedule, evenly_spaced, prunable_convs, prune, set_rotations_trainable
from pruners.config import load_config
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import Parser
from utils.dist import exact_fp32, setup, teardown
from runtime.steps import dense_step, supervised_step
from runtime.evaluate import evaluate, recalibrate_bn
from runtime.loop import make_scheduler, prepare, sgd
from utils.errors import UserError, run_main
from utils.lineage import check_chain, check_parent_fits, guard_rerun, parent_record
from utils.flops import compression, count_params, dense_flops, measure_costs, to_gflops
from runtime.stage import (StageRun, check_batch_shapes, check_result_dir, check_resume_world_size,
                           restore_training_state)
from utils.data import DataSettings, load_data


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config_path", required=True, help="the JSON config (keys: pruners/config.py)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from this stage's last checkpoint (default: the one in result_dir)")
    for key in ("result_dir", "data_dir", "device", "checkpoint"):
        p.add_argument(f"--{key}", default=None, help=f"overrides the config's '{key}'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key for this run (VALUE as JSON: --set epochs=5 --set "
                        "criterion=score; a bare word is a string); repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="when result_dir holds a finished stage-2 run (which this run replaces) or stage 3's results "
                        "(made from the network this run replaces), move them into <result_dir>/stale-<time>/ "
                        "instead of refusing")
    return p.parse_args(argv)


def parse_overrides(items):
    """{key: value} of --set KEY=VALUE items (VALUE read as JSON, else taken as a string)."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item}: expected KEY=VALUE (e.g. --set epochs=5)")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def targets(schedule):
    return [(r["target"], r["value"]) for r in schedule]


def check_resumable(ckpt, schedule, path):
    """The rounds a checkpoint has pruned (all before its round, and its round) must be the config's; later
    rounds may have been changed since (a target found out of reach, say)."""
    done = ckpt["round"] + 1
    if targets(ckpt["schedule"][:done]) != targets(schedule[:done]):
        raise UserError(f"--resume {path}: the {done} round(s) it has pruned had targets "
                        f"{targets(ckpt['schedule'][:done])}, the config's first {done} are "
                        f"{targets(schedule[:done])}; only rounds not yet begun may change")
    now, then = schedule[done - 1], ckpt["schedule"][done - 1]
    if (now["epochs"], now["lr"]) != (then["epochs"], then["lr"]):
        raise UserError(f"--resume {path}: round {done} is under way with epochs {then['epochs']} and lr "
                        f"{then['lr']}; the config now says {now['epochs']} and {now['lr']}")


def prune_round(model, data, ctx, cfg, spec, r, params_stage1):
    """Steps 1-6 of stage 2 (pruners/__init__.py) on `model`; returns the rebuilt model (on the device) and the round's
    report, with the evaluation of the pruned net before any fine-tuning."""
    torch.manual_seed(cfg["seed"] * 1_000_003 + r)  # the labels the true Fisher samples
    with exact_fp32():  # the Kronecker factors and their eigenbases in float32 whatever "tf32" allows in training
        model, report = prune(
            model.to(ctx.device), evenly_spaced(data.plain_train, cfg["fisher_batches"]), target=spec["target"],
            value=spec["value"], params_reference=params_stage1, limit=cfg["prune_ratio_limit"],
            damping=cfg["damping"], fisher_type=cfg["fisher_type"], criterion=cfg["criterion"],
            round_to=cfg["round_to"], image_size=data.image_size,
            num_batches=min(cfg["fisher_batches"], len(data.plain_train)), progress=ctx.is_main, mode=cfg["mode"])
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


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_path, {k: getattr(args, k) for k in ("result_dir", "data_dir", "device",
                                                                        "checkpoint", "resume")},
                      sets=parse_overrides(args.overrides))
    schedule = cfg["schedule"]
    check_result_dir(cfg["result_dir"])
    ctx = setup(cfg["device"], cfg["seed"], cfg["amp"], cfg["channels_last"], cfg["tf32"])
    run = StageRun("prune", cfg["result_dir"], ctx)
    stage1_path = cfg["checkpoint"] or os.path.join(cfg["result_dir"], "sp", "checkpoint.pt")
    if not cfg["checkpoint"] and not os.path.isfile(stage1_path):
        raise UserError(f"no stage-1 checkpoint at {stage1_path}: run main_sp.py with this result_dir first "
                        f"(or set the config's 'checkpoint')")
    if not cfg["checkpoint"]:
        check_chain(cfg["result_dir"], ("sp",))
    stage1 = load_checkpoint(stage1_path, ("sp",), "checkpoint")
    parent = parent_record("sp", stage1_path)
    if cfg["checkpoint"]:
        check_parent_fits(cfg["result_dir"], parent, "checkpoint")
    resume_from = run.checkpoint_path if cfg["resume"] is True else cfg["resume"]
    ckpt = load_checkpoint(resume_from, ("prune",), "--resume") if resume_from else None
    if ckpt and not {"round", "history", "schedule"} <= set(ckpt):
        raise UserError(f"--resume {resume_from}: lacks the pruning state (round, history, schedule)")
    if ckpt:
        check_resumable(ckpt, schedule, resume_from)
        check_resume_world_size(ckpt, ctx, resume_from)
        began_from = (ckpt.get("parent") or {}).get("sha256")
        if began_from and began_from != parent["sha256"]:
            raise UserError(f"--resume {resume_from}: began from another stage-1 network than {stage1_path} holds "
                            f"now (stage 1 was rerun since); start stage 2 afresh")
    if ckpt:  # the run resumed inherited stage 1's pipeline and fixed its own augmentation
        recorded, source = ckpt.get("pipeline"), f"--resume {resume_from}"
    else:
        recorded, source = stage1.get("pipeline"), f"checkpoint {stage1_path}"
    data = load_data(DataSettings.of(cfg), ctx, recorded=recorded, source=source, resuming=bool(ckpt))
    if stage1["arch"]["num_classes"] != data.num_classes:
        raise UserError(f"checkpoint {stage1_path}: its network has {stage1['arch']['num_classes']} classes, "
                        f"data_dir {cfg['data_dir']} holds {data.num_classes}")
    model = model_from_checkpoint(stage1, stage1_path, "checkpoint")
    params_stage1 = count_params(model)
    check_batch_shapes(model, data.image_size, data.train.batch_size, resize_fixed=recorded is not None)
    if ckpt:
        model = model_from_checkpoint(ckpt, resume_from, "--resume")
        first_round, history = ckpt["round"], ckpt["history"]
    else:
        first_round, history = 0, []
    # every round still to prune, checked before any work (the resumed round is pruned already)
    later = first_round + 1 if ckpt else 0
    check_schedule(model, schedule[later:], cfg["prune_ratio_limit"], params_stage1, first_round=later,
                   image_size=data.image_size, round_to=cfg["round_to"])
    guard_rerun(cfg["result_dir"], "prune", args.overwrite, ctx.is_main, resuming=bool(ckpt))
    run.open(data.pipeline, parent=parent, resumed=ckpt, start_step=stage1.get("tb_step", 0))

    logged = sum(spec["epochs"] for spec in schedule[:first_round])  # TensorBoard steps of earlier rounds
    total_epochs = sum(spec["epochs"] for spec in schedule)
    if cfg["mode"] == "open":  # the static network: every block, the switches untouched
        step, evals = dense_step, (("dense", "open"),)
    else:
        step, evals = supervised_step, (("dense", "open"), ("routed", "hard"))
    for r in range(first_round, len(schedule)):
        spec, resuming = schedule[r], ckpt is not None and r == first_round
        if not resuming:
            model, report = prune_round(model, data, ctx, cfg, spec, r, params_stage1)
            history.append(report)
            run.logger.scalars("prune/round", {k: report[k] for k in ("compression", "params", "gflops")},
                               run.step_offset + logged)
        set_rotations_trainable(model, not cfg["fix_rotation"])
        model, ddp = prepare(model, ctx)
        optimizer = sgd([p for p in model.parameters() if p.requires_grad], spec["lr"], cfg["momentum"],
                        cfg["weight_decay"])
        scheduler = make_scheduler(optimizer, cfg["scheduler"], spec["epochs"], len(data.train))
        costs = measure_costs(model, data.image_size)

        def own_state():  # this round's: called only while it runs
            return {"round": r, "history": history, "schedule": schedule, "config": cfg,
                    "params_stage1": params_stage1, "stage1_checkpoint": stage1_path}

        def save(epoch):
            run.save(model, optimizer, scheduler, epoch, own_state())

        if resuming:
            start = restore_training_state(ckpt, optimizer, scheduler)
        else:
            start = 0
            save(0)  # right after pruning: --resume continues the fine-tuning from here
        run.fit(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, step_fn=step,
                epochs=spec["epochs"], start_epoch=start, costs=costs, own_state=own_state, log_offset=logged,
                evals=evals, total_epochs=total_epochs)
        t0 = time.perf_counter()
        # One epoch of shuffled, augmented training batches in the mode the weights were trained in: the
        # statistics they were trained under, over every training image.
        recalibrate_bn(ddp, data.train, ctx, mode=cfg["mode"], batches=len(data.train))
        history[-1]["bn_seconds"] = time.perf_counter() - t0
        save(spec["epochs"])  # with the re-estimated BN statistics that the next round and the metrics use
        logged += spec["epochs"]

    params = count_params(model)
    run.finish(model, ddp, data, costs, mode="open", extra={"mode": cfg["mode"],
        "params_stage1": params_stage1, "compression": compression(params, params_stage1),
        "dense_gflops": to_gflops(dense_flops(costs)), "ranks": model.arch["ranks"],
        "layers_unpruned": [n for n in prunable_convs(model) if n not in model.arch["ranks"]], "rounds": history,
        "stage1_checkpoint": stage1_path})
    teardown()


if __name__ == "__main__":
    run_main(main)
