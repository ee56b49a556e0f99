"""What the switches add, deconfounded: every arm trained as long, converged, at budgets where FLOPs bind,
on a difficulty that more compute can fix, over seeds and folds of all of digits.

Two difficulty families of scikit-learn's 1,797 digits, every image its own severity (5 levels):
  transform  the digit rotated, shrunk, shifted and cluttered with strokes of other digits
             (evaluation/digits.transformed_digits): all of it is there, more processing can undo it
  noise      contrast lowered and pixel noise added (evaluation/digits.digits_images): destroys information
For each seed the images are dealt into `folds` stratified folds; a unit (seed x fold) trains on the other
folds (their validation split, --val_split of them, is where every choice is made) and tests on its fold, so
every image is tested once per seed.

Per unit, after stage 1 (main_sp.py, --augment crop), every arm gets the same epochs, each phase under a
cosine schedule (the epochs-accounting table of the report):
  unpruned   stage 1's network fine-tuned as long, every block (prune + rl + routes epochs)
  static     static pruning alone (stage 2, ranking per FLOP) pushed to the budget's GFLOPs, fine-tuned as long
  dynamic    static + dynamic: stage 2 to the budget's GFLOPs / (1 - dyn_share) (`prune` epochs, same ranking),
             stage 3 (--controller; counterfactual: its full form, --flip_blocks 0; `rl` epochs) trained to the
             budget, then its last phase (`routes` epochs):
             the backbone fine-tuned on the switches' greedy routes, the threshold recalibrated (gates/ending.py)
  fixed      the best fixed route of stage 3's network (before that last phase) within 10% below the budget,
             chosen on validation, fine-tuned on its route as many epochs from the same point as the dynamic
             network's last phase: neither has more epochs
The budget of a unit is the cost of the best fixed route of the dynamic arm's stage-2 network (on
validation) among those within 10% below `budget` x the unpruned network's GFLOPs, so that the fixed route
can cost exactly what the dynamic network is trained to and static pruning is pushed to. Budgets (fractions
of the unpruned GFLOPs) are compared where static pruning binds: the static curve (`curve` plus the compared
budgets) finds the knee, the largest budget where static pruning loses 1 point or more against its ceiling.
Diagnostics (labels of difficulty allowed, never in a headline number): the validation check that the full
network beats the best fixed route by more on hard images than on easy ones (stage 3's network, before its
last phase, BN re-estimated for each); the level-router, each
difficulty level given its best route on validation at equal average GFLOPs (BN per route), evaluated as is
and fine-tuned as long as the fixed route: if it beats the fixed route, the controller is the bottleneck;
if not, that budget has no routing headroom. Convergence: on the `double` seeds' units every arm is trained
again with each phase's epochs doubled (and doubled again: `factors`) at one budget; an arm is converged at a
factor when doubling it moves its validation accuracy by under 0.3 points.
Statistics: paired per image, pooled over units; a bootstrap over units then images (the variance of
training runs), McNemar, and the smallest difference the design detects. Wall-clock: the trained networks
of one unit at every compared budget, exported (deploy/export.py), batch 1 and 128, eager and onnxruntime,
taking turns in one run.

    python -m evaluation.crossfit --family transform --speed  # a difficulty compute can fix (~2.5 h on 2 busy cores)
    python -m evaluation.crossfit --family noise --speed      # a difficulty that destroys information
    python -m evaluation.crossfit report --family transform   # the report of the units finished so far
    python -m evaluation.crossfit --quick --out DIR --results DIR   # the same code path in a minute or two
    python -m evaluation.crossfit --scale cifar100 --data_dir DATA --speed   # a dataset of its own (one GPU)

Each finished unit writes its small result (per-image correctness of every arm) to
<results>/crossfit/<family>/units/<unit>.json; a rerun (on any machine) skips the units found there and
reports on them. The work (checkpoints, logs) is under <out> (default evaluation/out/crossfit/<family>), reused by
a rerun of the same command (evaluation/runner.py). The report: <results>/crossfit/<family>/report.{md,json}.
"""
import argparse
import copy
import itertools
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from evaluation import stats
from evaluation.digits import digits_images, transformed_digits, write_split
from evaluation.routes import best_fixed_route, recalibrate_route, route_flops
from evaluation.runner import Task, run_all
from gates.ending import end_training
from runtime.checkpoint import load_model, save_checkpoint
from runtime.loop import make_scheduler, sgd, train_epoch
from runtime.predict import checkpoint_costs, load, predict
from runtime.steps import dense_step, touch_switches
from utils.cli import Parser
from utils.data import BatchLoader, DataSettings, split_val
from utils.dist import setup
from utils.errors import UserError, run_main
from utils.files import read_json, write_json
from utils.flops import dense_flops, skipped_flops
from utils.nets import is_switch, unwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Epochs after stage 1, the same for every arm: prune + rl + routes (the dynamic arm's three phases; the
# fixed route shares the first two); lr: the peak of each phase's cosine schedule. The settings were fixed
# by a pilot on one unit's validation split (evaluation/results/crossfit/pilot.md).
SCALES = {
    "digits": dict(resize=16, depth=14, width=1, bs=64, val_split=0.2, folds=2, seeds=(0, 1, 2), levels=5,
                   sp=dict(epochs=60, lr=0.1),
                   epochs=dict(prune=8, rl=10, routes=6), lr=dict(prune=0.02, rl=0.05, routes=0.02, dense=0.02),
                   fisher_batches=16, alpha=1.0, rl_weight=0.01, dyn_share=0.2,
                   budgets=(0.7, 0.4, 0.15, 0.07), curve=(0.25, 0.1, 0.04),
                   double=dict(seeds=(0, 1, 2), folds=(0, 1), budget=0.15, factors=(2, 4, 8, 16, 32)),
                   augment="crop", device="cpu", workers=0),
    "quick": dict(resize=8, depth=8, width=1, bs=32, val_split=0.25, folds=2, seeds=(0,), levels=3,
                  sp=dict(epochs=1, lr=0.05),
                  epochs=dict(prune=1, rl=1, routes=1), lr=dict(prune=0.01, rl=0.01, routes=0.01, dense=0.01),
                  fisher_batches=2, alpha=1.0, rl_weight=0.01, dyn_share=0.1,
                  budgets=(0.7,), curve=(0.4,), double=dict(seeds=(0,), folds=(0,), budget=0.7), max_images=240,
                  augment="crop", device="cpu", workers=0),
    # A dataset with its own test split (--data_dir; bench/run_cifar100.sh: CIFAR-100, ResNet-32 width 4, one
    # GPU): one unit per seed, no difficulty levels. Not run yet (no GPU with CIFAR-100 where this was
    # written): the epochs follow the original recipe's proportions, the doubling check says if they suffice.
    "cifar100": dict(resize=32, depth=32, width=4, bs=128, val_split=0.1, folds=1, seeds=(0,), levels=1,
                     sp=dict(epochs=200, lr=0.1),
                     epochs=dict(prune=60, rl=30, routes=10), lr=dict(prune=0.01, rl=0.01, routes=0.001, dense=0.01),
                     fisher_batches=200, alpha=1.0, rl_weight=0.01, dyn_share=0.2,
                     budgets=(0.4, 0.2, 0.1), curve=(0.7, 0.05), double=dict(seeds=(0,), folds=(0,), budget=0.2),
                     augment="cifar", device="cuda", workers=16),
}
FAMILIES = ("transform", "noise")
EXHAUSTIVE = 10  # up to this many switches every fixed route is tried (2^S); beyond, only the routes given
CONVERGED = 0.3  # points of validation accuracy that doubling the epochs may move an arm


def bkey(b):
    return f"b{b:.3f}"


def total_epochs(s, factor=1):
    return factor * sum(s["epochs"].values())


# ------------------------------------------------------------------------------------------ the data

def family_images(s, family):
    if family == "transform":
        return transformed_digits(s["resize"], seed=0, levels=s["levels"])
    return digits_images(s["resize"], seed=0, levels=s["levels"])


def write_units(s, family, out, data_dir=None):
    """The images once (images.npz: labels, difficulty levels), then one data folder per unit:
    <out>/s<seed>f<fold>/data/{train,test}/<class>/<image index>.png. Returns [(name, split)].
    With `data_dir` (a dataset with its own test split), one unit per seed whose data is a link to it."""
    if data_dir is not None:
        units = []
        for seed in s["seeds"]:
            name = f"s{seed}f0"
            os.makedirs(os.path.join(out, name), exist_ok=True)
            link = os.path.join(out, name, "data")
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(data_dir), link)
            units.append((name, SimpleNamespace(seed=seed, fold=0)))
        return units
    images, labels, level = family_images(s, family)
    if s.get("max_images"):
        images, labels, level = images[:s["max_images"]], labels[:s["max_images"]], level[:s["max_images"]]
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "images.npz"), labels=labels, level=level)
    units = []
    for split in stats.cross_fit_splits(len(labels), s["folds"], s["seeds"], val_fraction=0.0, labels=labels):
        name = f"s{split.seed}f{split.fold}"
        root = os.path.join(out, name, "data")
        if not os.path.isdir(os.path.join(root, "test")):
            tmp = root + ".partial"
            write_split(tmp, images, labels, split.train, split.test)
            os.replace(tmp, root)
        units.append((name, split))
    return units


def unit_ids(data_dir, split="test", n=None):
    """The image indices of a unit's split folder in the order the loaders read it (sorted class, then file);
    a dataset of its own (files not named by index, or pickles): 0 .. n - 1."""
    d = os.path.join(data_dir, split)
    try:
        return np.array([int(f.split(".")[0]) for c in sorted(os.listdir(d))
                         for f in sorted(os.listdir(os.path.join(d, c)))])
    except (OSError, ValueError):
        if n is None:
            raise
        return np.arange(n)


def levels_of(u, ids):
    """The difficulty level of each image id (images.npz beside the units; a dataset of its own: all 0).
    ids None: the whole array (None for a dataset of its own)."""
    path = os.path.join(os.path.dirname(os.path.normpath(u)), "images.npz")
    if ids is None:
        return np.load(path)["level"] if os.path.isfile(path) else None
    return np.load(path)["level"][ids] if os.path.isfile(path) else np.zeros(len(ids), dtype=np.int64)


def val_train_ids(w, n=None):
    """(train ids, val ids): how the stages split a unit's train folder (utils.data.split_val, the same seed);
    `n`: the number of training images, for a dataset whose files are not named by index."""
    ids = torch.as_tensor(unit_ids(w.data_dir, "train", n))
    train, _, val, _ = split_val(ids, ids, w.val_split, w.seed)
    return train.numpy(), val.numpy()


# ------------------------------------------------------------------------------------------ the tasks

def common(s, u, seed):
    return ["--bs", str(s["bs"]), "--num_workers", str(s["workers"]), "--seed", str(seed), "--device", s["device"],
            "--data_dir", os.path.join(u, "data"), "--val_split", str(s["val_split"])]


def prune_config(s, u, seed, result_dir, gflops, epochs):
    """Stage 2 from the stage-1 network to `gflops` (ranking per FLOP), fine-tuned `epochs` at the prune lr."""
    return {"result_dir": result_dir, "data_dir": os.path.join(u, "data"),
            "checkpoint": os.path.join(u, "sp", "checkpoint.pt"), "num_workers": s["workers"], "resize": s["resize"],
            "prune_mode": "one_pass", "gflops": gflops, "epochs": epochs, "lr": s["lr"]["prune"], "bs": s["bs"],
            "fisher_batches": s["fisher_batches"], "seed": seed, "device": s["device"], "val_split": s["val_split"],
            "round_to": 1, "criterion": "score_per_flop", "final_split": "val"}


def unpruned_gflops(u):
    return read_json(os.path.join(u, "targets.json"))["unpruned_gflops"]


def budget_gflops(u, b):
    return read_json(os.path.join(u, bkey(b), "budget.json"))["gflops"]


def arm_root(u, factor):
    """Where a unit's arms trained with `factor` x the epochs live (1: the unit itself; 2: <u>/x2)."""
    return u if factor == 1 else os.path.join(u, f"x{factor}")


def unit_tasks(s, name, seed, u, controller, me, results, factor=1):
    """The tasks of one unit (factor 1) or of its doubling check at s["double"]["budget"] (factor 2, 4, ...)."""
    tag, r = ("" if factor == 1 else f"/x{factor}"), arm_root(u, factor)
    e = {k: v * factor for k, v in s["epochs"].items()}
    step = [*me, "--scale", s["name"], "--controller", controller]
    tasks = []
    if factor == 1:
        tasks += [
            Task(f"{name}/sp", ["main_sp.py", "--network", "resnet", "--depth", str(s["depth"]), "--width",
                                str(s["width"]), "--epochs", str(s["sp"]["epochs"]), "--lr", repr(s["sp"]["lr"]),
                                "--resize", str(s["resize"]), "--augment", s["augment"], "--final_split", "val",
                                "--result_dir", u, *common(s, u, seed)], os.path.join(u, "sp", "metrics.json")),
            Task(f"{name}/targets", [*step, "targets", u], os.path.join(u, "targets.json"), [f"{name}/sp"])]
        for f in s["curve"]:
            d = os.path.join(u, "curve", f"f{f:.3f}")
            tasks.append(Task(f"{name}/curve{f:.3f}", ["main_prune.py", "--config_path", os.path.join(d, "config.json"),
                                                       "--overwrite"],
                              os.path.join(d, "prune", "metrics.json"), [f"{name}/targets"],
                              lambda d=d, f=f: prune_config(s, u, seed, d, f * unpruned_gflops(u), total_epochs(s)),
                              os.path.join(d, "config.json")))
    tasks.append(Task(f"{name}{tag}/dense", [*step, "dense", u, "--factor", str(factor)],
                      os.path.join(r, "dense", "dense.json"), [f"{name}/targets"]))
    budgets = s["budgets"] if factor == 1 else (s["double"]["budget"],)
    finals = [f"{name}{tag}/dense"]
    for b in budgets:
        k = bkey(b)
        d = os.path.join(r, k)
        tasks.append(Task(f"{name}{tag}/prune{k}", ["main_prune.py", "--config_path",
                                                    os.path.join(d, "prune_config.json"), "--overwrite"],
                          os.path.join(d, "prune", "metrics.json"), [f"{name}/targets"],
                          lambda d=d, b=b: prune_config(s, u, seed, d, b * unpruned_gflops(u) / (1 - s["dyn_share"]),
                                                        e["prune"]),
                          os.path.join(d, "prune_config.json")))
        if factor == 1:
            tasks.append(Task(f"{name}/budget{k}", [*step, "budget", u, "--budget", repr(b)],
                              os.path.join(d, "budget.json"), [f"{name}/prune{k}"]))
        budget_dep = f"{name}/budget{k}"
        sd = os.path.join(d, "static")
        tasks.append(Task(f"{name}{tag}/static{k}", ["main_prune.py", "--config_path", os.path.join(sd, "config.json"),
                                                     "--overwrite"],
                          os.path.join(sd, "prune", "metrics.json"), [budget_dep],
                          lambda sd=sd, b=b: prune_config(s, u, seed, sd, budget_gflops(u, b), total_epochs(s, factor)),
                          os.path.join(sd, "config.json")))
        cd = os.path.join(d, controller)
        tasks.append(Task(f"{name}{tag}/rl{k}", lambda d=d, cd=cd, b=b: [
            "main_rl_prune.py", "--checkpoint", os.path.join(d, "prune", "checkpoint.pt"), "--result_dir", cd,
            "--controller", controller, "--target_gflops", repr(budget_gflops(u, b)), "--overwrite",
            "--epochs", str(e["rl"]), "--lr", repr(s["lr"]["rl"]), "--alpha", repr(s["alpha"]),
            "--rl_weight", repr(s["rl_weight"]), "--route_epochs", "0", "--final_split", "val",
            *(["--flip_blocks", "0"] if controller == "counterfactual" else []), *common(s, u, seed)],
            os.path.join(cd, "rl", "metrics.json"), [f"{name}{tag}/prune{k}", budget_dep]))
        tasks.append(Task(f"{name}{tag}/finish{k}", [*step, "finish", u, "--budget", repr(b), "--factor", str(factor)],
                          os.path.join(cd, "finish.json"), [f"{name}{tag}/rl{k}"]))
        finals += [f"{name}{tag}/finish{k}", f"{name}{tag}/static{k}"]
    if factor == 1:
        finals += [f"{name}/curve{f:.3f}" for f in s["curve"]]
    tasks.append(Task(f"{name}{tag}/collect", [*step, "collect", u, "--factor", str(factor), "--results", results],
                      unit_result(results, name, controller, factor), finals))
    return tasks


def unit_result(results, name, controller, factor=1):
    """<results>/units/<unit>[-x2][-<controller>].json: a finished unit's small result, committed."""
    tail = ("" if factor == 1 else f"-x{factor}") + ("" if controller == "counterfactual" else f"-{controller}")
    return os.path.join(results, "units", f"{name}{tail}.json")


def factors(s):
    """The doubling ladder's epoch factors beyond 1 (2: doubled; 2, 4: doubled and doubled again)."""
    return tuple(s["double"].get("factors", (2,)))


def plan(s, units, out, controller, results):
    """Every unit's tasks (those without a result yet), then the doubling checks' (after all, so that a run
    cut short has whole units)."""
    me = ["-m", "evaluation.crossfit"]
    tasks, doubled = [], []
    for name, split in units:
        u = os.path.join(out, name)
        if not os.path.isfile(unit_result(results, name, controller)):
            tasks += unit_tasks(s, name, split.seed, u, controller, me, results)
    for f in factors(s):  # every unit's doubled arms before any unit's doubled again
        for name, split in units:
            if split.seed in s["double"]["seeds"] and split.fold in s["double"]["folds"] and not os.path.isfile(
                    unit_result(results, name, controller, f)):
                doubled += unit_tasks(s, name, split.seed, os.path.join(out, name), controller, me, results, factor=f)
    # a finished unit's stage 1 and budget, and what they depend on, for its doubled arms (reused if here)
    every = {t.name: t for name, split in units
             for t in unit_tasks(s, name, split.seed, os.path.join(out, name), controller, me, results)}
    have = {t.name for t in tasks + doubled}
    needed = [d for t in doubled for d in t.deps]
    while needed:
        d = needed.pop()
        if d not in have:
            have.add(d)
            tasks.append(every[d])
            needed += every[d].deps
    return tasks + doubled


# -------------------------------------------------------------------------------- in-process steps

def unit_where(s, u, controller="counterfactual"):
    """Where a unit's data is and how its stages split it (the unit's folder name says its seed)."""
    name = os.path.basename(os.path.normpath(u))
    seed = int(name[1:].split("f")[0])
    return SimpleNamespace(data_dir=os.path.join(u, "data"), val_split=s["val_split"], seed=seed, bs=s["bs"],
                           controller=controller)


def load_unit(w, path, ctx, test=True):
    """(ddp, data, costs, ckpt) of a checkpoint with the unit's data and validation split."""
    settings = DataSettings(data_dir=w.data_dir, bs=w.bs, val_split=w.val_split, seed=w.seed,
                            final_split="test" if test else "val")
    net = load(path, settings, ctx)
    if net.data.eval_name != "val":
        raise UserError(f"{w.data_dir}: every choice is made on a validation split: give --val_split > 0")
    return net.ddp, net.data, net.costs, net.ckpt


def save_like(ckpt, model, path, **extra):
    """A checkpoint in the stages' format (the one deploy/export.py reads): `ckpt` with the model's weights."""
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "optimizer", "scheduler")}
    payload.update(model=model.state_dict(), optimizer=None, scheduler=None, **extra)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(path, payload)


def per_image(ddp, loader, mode="hard", route=None):
    """Correctness and the 0/1 route (N, S) of every image of `loader`, in order, as numpy arrays
    (runtime.predict); `route`: a fixed route in `open` mode (None: every block)."""
    got = predict(ddp, loader, mode=mode, route=route)
    return got.correct.numpy(), got.routes.numpy()


def bits(correct):
    return "".join("1" if c else "0" for c in np.asarray(correct).astype(bool))


def unbits(text):
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def all_routes(costs):
    return [list(r) for r in itertools.product((0, 1), repeat=len(costs["blocks"]))]


def route_table_val(ddp, data, ctx, costs):
    """The fixed routes of the network (BN as it is) with their cost and per-image validation correctness:
    every route up to EXHAUSTIVE switches; beyond, the routes of evaluation.routes.best_fixed_route's greedy
    block removal on validation, from every block run to none."""
    if len(costs["blocks"]) <= EXHAUSTIVE:
        candidates = all_routes(costs)
    else:
        route = [1] * len(costs["blocks"])
        candidates = [list(route)]
        for j, _, _ in best_fixed_route(ddp, data.eval, ctx, costs, 0.0)["history"]:
            route[j] = 0
            candidates.append(list(route))
    rows = []
    for r in candidates:
        c, _ = per_image(ddp, data.eval, "open", r)
        rows.append({"route": r, "flops": route_flops(costs, r), "correct": c})
    return rows


def best_of(rows, high, low=0.0):
    """The route of `rows` with the most validation images right among those costing in [low, high]
    (ties: the cheaper... then the first)."""
    ok = [x for x in rows if low <= x["flops"] <= high]
    return max(ok, key=lambda x: (x["correct"].sum(), -x["flops"])) if ok else None


def loader_of(x, y, bs, ctx, pipeline, train, seed=0, augment=None):
    return BatchLoader(x, y, bs, train=train, device=ctx.device, mean=pipeline["mean"], std=pipeline["std"],
                       seed=seed, augment=augment)


def targets_step(s, w, u, ctx, args):
    """The unpruned network's GFLOPs (every block, no switch): budgets are fractions of it."""
    costs = checkpoint_costs(os.path.join(u, "sp", "checkpoint.pt"))
    write_json(os.path.join(u, "targets.json"), {"unpruned_gflops": dense_flops(costs) / 1e9})


def train_dense(ddp, data, ctx, epochs, lr, desc, route=None):
    """`epochs` of SGD on the backbone, every block (or the fixed `route`), cosine lr, the stages' momentum
    and weight decay; the switches untouched."""
    model = unwrap(ddp)
    model.route = route
    opt = sgd([p for n, p in model.named_parameters() if not is_switch(n)], lr, 0.9, 5e-4)
    sched = make_scheduler(opt, "cosine", epochs, len(data.train))
    for epoch in range(epochs):
        data.train.set_epoch(epoch)
        train_epoch(ddp, data.train, opt, sched, dense_step, ctx, epoch, desc=desc)  # open mode: the route
    model.route = None


def dense_step_(s, w, u, ctx, args):
    """The unpruned control: stage 1's network fine-tuned every block as long as every other arm."""
    r = arm_root(u, args.factor)
    ddp, data, costs, ckpt = load_unit(w, os.path.join(u, "sp", "checkpoint.pt"), ctx, test=False)
    train_dense(ddp, data, ctx, total_epochs(s, args.factor), s["lr"]["dense"], "unpruned")
    model = unwrap(ddp)
    save_like(ckpt, model, os.path.join(r, "dense", "model.pt"))
    write_json(os.path.join(r, "dense", "dense.json"), {"epochs": total_epochs(s, args.factor),
                                                        "gflops": dense_flops(costs) / 1e9})


def level_check(full, route, level):
    """Validation accuracy (%) by difficulty level of the full network and of a fixed route, and the gap."""
    out = []
    for k in np.unique(level):
        m = level == k
        out.append({"level": int(k), "images": int(m.sum()), "full": float(full[m].mean() * 100),
                    "route": float(route[m].mean() * 100), "gap": float((full[m].mean() - route[m].mean()) * 100)})
    return out


def budget_step(s, w, u, ctx, args):
    """The unit's budget at fraction `b` of the unpruned GFLOPs, fixed before stage 3: the cost of the best
    fixed route of the dynamic arm's stage-2 network on validation among the routes within 10% below
    b x unpruned (every route below, if none is). Also the validation check of the difficulty: the full
    network against that route, BN re-estimated for it, by level."""
    d = os.path.join(u, bkey(args.budget))
    ddp, data, costs, _ = load_unit(w, os.path.join(d, "prune", "checkpoint.pt"), ctx, test=False)
    limit = args.budget * unpruned_gflops(u) * 1e9
    # stage 3 can only be trained to a cost above every gated block skipped, its switches evaluated
    rows = [x for x in route_table_val(ddp, data, ctx, costs) if x["flops"] > 1.02 * skipped_flops(costs)]
    best = best_of(rows, limit, 0.9 * limit) or best_of(rows, limit)
    if best is None:
        raise UserError(f"no fixed route of {d}/prune costs at most {limit / 1e9:.5f} GFLOPs: lower dyn_share")
    full, _ = per_image(ddp, data.eval, "open")
    recalibrate_route(ddp, data.train, ctx, best["route"], batches=len(data.train))
    routed, _ = per_image(ddp, data.eval, "open", best["route"])
    _, val_ids = val_train_ids(w, len(data.train.y) + len(data.eval.y))
    level = levels_of(u, val_ids)
    write_json(os.path.join(d, "budget.json"), {
        "fraction": args.budget, "limit_gflops": limit / 1e9, "gflops": best["flops"] / 1e9, "route": best["route"],
        "val_acc_route": float(routed.mean() * 100), "val_acc_full": float(full.mean() * 100),
        "level_check": level_check(full, routed, level)})


def level_routes(rows, level, budget_flops, bins=4000, low=0.9):
    """The level-router: one route per difficulty level maximising the validation images right, its average
    cost over the validation images within [low, 1] x `budget_flops` (as the fixed route's; routes above the
    budget allowed, and below `low` only if nothing fits the window): a multiple-choice knapsack, solved
    exactly on costs rounded up to 1/bins of the most expensive route's (ties: the first, cheaper, found)."""
    levels = np.unique(level)
    n = np.array([(level == k).sum() for k in levels])
    unit = max(x["flops"] for x in rows) * n.sum() / bins
    cap = int(np.floor(budget_flops * n.sum() / unit))
    neg = -1e18
    dp = np.full(cap + 1, neg)  # the most right answers with a total cost of exactly m
    dp[0] = 0.0
    choice = []
    for li, k in enumerate(levels):
        m = level == k
        new = np.full(cap + 1, neg)
        arg = np.full(cap + 1, -1)
        for ri, x in enumerate(rows):
            c = int(np.ceil(x["flops"] * n[li] / unit))
            if c > cap:
                continue
            cand = np.full(cap + 1, neg)
            cand[c:] = dp[:cap + 1 - c] + float(x["correct"][m].sum())
            better = cand > new
            new[better], arg[better] = cand[better], ri
        choice.append(arg)
        dp = new
    lo = int(np.floor(low * cap))
    window = dp[lo:] if (dp[lo:] > neg / 2).any() else dp
    if not (window > neg / 2).any():
        return None
    picks, m = [], int(np.argmax(window)) + (cap + 1 - len(window))
    for li in range(len(levels) - 1, -1, -1):
        ri = int(choice[li][m])
        picks.append(ri)
        m -= int(np.ceil(rows[ri]["flops"] * n[li] / unit))
    picks.reverse()
    return {int(k): rows[ri]["route"] for k, ri in zip(levels, picks)}


class LevelRouted:
    """Train batches whose labels carry the difficulty level (label + classes x level): each level's images
    run that level's fixed route, the cross-entropy averaged over the batch."""

    def __init__(self, routes, classes):
        self.routes, self.classes = routes, classes

    def __call__(self, model, x, y):
        net = unwrap(model)
        level, y = y // self.classes, y % self.classes
        loss, right = 0.0, 0.0
        for k, r in self.routes.items():
            m = level == k
            if not m.any():
                continue
            net.route = r
            logits, _, _ = model(x[m], "open")
            loss = loss + F.cross_entropy(logits, y[m], reduction="sum")
            right = right + (logits.argmax(1) == y[m]).sum()
        net.route = None
        loss = loss / x.shape[0]
        with torch.no_grad():
            stats = {"loss": loss.detach(), "acc": right / x.shape[0],
                     "exec_rate": torch.zeros(net.num_switches, device=x.device)}
        return touch_switches(model, loss), stats


def level_router_eval(ddp, data, ctx, routes, level_train, level_val, level_test):
    """Per-image correctness on val and test of the level-router, BN re-estimated per route on the training
    images of its level."""
    model = unwrap(ddp)
    state = copy.deepcopy(model.state_dict())
    p = data.pipeline
    val = np.zeros(len(level_val), dtype=bool)
    test = np.zeros(len(level_test), dtype=bool)
    for k, r in routes.items():
        model.load_state_dict(state)
        mt = torch.as_tensor(level_train == k, device=data.train.x.device)
        if mt.sum() >= 2:
            bn = loader_of(data.train.x[mt], data.train.y[mt], min(data.train.batch_size, int(mt.sum())), ctx, p,
                           True, data.train.seed, p["augment"])
            recalibrate_route(ddp, bn, ctx, r, batches=len(bn) + 1)
        for lv, x, y, out in ((level_val, data.eval.x, data.eval.y, val), (level_test, data.test.x, data.test.y, test)):
            m = lv == k
            if m.any():
                mm = torch.as_tensor(m, device=x.device)
                c, _ = per_image(ddp, loader_of(x[mm], y[mm], data.eval.batch_size, ctx, p, False), "open", r)
                out[m] = c
    model.load_state_dict(state)
    return val, test


def finish_step(s, w, u, ctx, args):
    """From stage 3's network (before its last phase), `routes` epochs each: the dynamic network on its
    greedy routes (gates/ending.py, as stage 3 ends), the best fixed route at the budget, and the
    level-router diagnostic (as is and fine-tuned). Per-image validation and test correctness of each.
    --redo level: the level-router diagnostic alone, again, into the unit's finish.json."""
    k = bkey(args.budget)
    d = os.path.join(arm_root(u, args.factor), k, w.controller)
    path = os.path.join(d, "rl", "checkpoint.pt")
    epochs = s["epochs"]["routes"] * args.factor
    target = budget_gflops(u, args.budget) * 1e9
    ddp, data, costs, ckpt = load_unit(w, path, ctx)
    train_ids, val_ids = val_train_ids(w, len(data.train.y) + len(data.eval.y))
    test_ids = unit_ids(w.data_dir, "test", len(data.test.y))
    lv = {"train": levels_of(u, train_ids), "val": levels_of(u, val_ids), "test": levels_of(u, test_ids)}
    model = unwrap(ddp)
    start = copy.deepcopy(model.state_dict())
    if args.redo == "level":
        out = read_json(os.path.join(d, "finish.json"))
        for key in ("level", "level_ft"):
            out.pop(key, None)
        out.update(level_router(s, ddp, data, ctx, costs, start, route_table_val(ddp, data, ctx, costs), target,
                                epochs, lv))
        write_json(os.path.join(d, "finish.json"), out)
        return
    out = {"budget_gflops": target / 1e9, "epochs": epochs, "test_ids": test_ids.tolist(), "val_ids": val_ids.tolist()}
    # the dynamic network's last phase
    rl_args = SimpleNamespace(route_epochs=epochs, epochs=ckpt["epoch"], route_lr=s["lr"]["routes"], lr=s["lr"]["rl"],
                              momentum=0.9, weight_decay=5e-4)
    ending = end_training(ddp, data, ctx, costs, target, rl_args)
    save_like(ckpt, model, os.path.join(d, "dynamic.pt"))
    val, test = predict(ddp, data.eval, costs), predict(ddp, data.test, costs)
    vc, tc, ta, tf = val.correct.numpy(), test.correct.numpy(), test.routes.numpy(), test.flops.numpy() / 1e9
    out["dynamic"] = {"val": bits(vc), "test": bits(tc), "val_gflops": float(val.flops.mean() / 1e9),
                      "gflops": float(tf.mean()), "last_shift": ending["calibration"][-1]["shift"],
                      "test_distinct_routes": int(len(np.unique(ta, axis=0))),
                      "by_level": [{"level": int(x), "gflops": float(tf[lv["test"] == x].mean()),
                                    "acc": float(tc[lv["test"] == x].mean() * 100)} for x in np.unique(lv["test"])]}
    # the best fixed route from the same point (within 10% below the budget, as the budget's own route is),
    # and the check of the difficulty: on stage 3's network (trained on routes, so that a route is not
    # penalised for being untrained), every block against that route, BN re-estimated for each, by level
    model.load_state_dict(start)
    rows = route_table_val(ddp, data, ctx, costs)
    best = best_of(rows, target * 1.0001, 0.9 * target) or best_of(rows, target * 1.0001)
    check = {"route": best["route"]}
    for key, route in (("full", [1] * len(costs["blocks"])), ("route", best["route"])):
        model.load_state_dict(start)
        recalibrate_route(ddp, data.train, ctx, route, batches=len(data.train))
        check[key] = [per_image(ddp, data.eval, "open", route)[0], per_image(ddp, data.test, "open", route)[0]]
    out["difficulty_check"] = {"route": best["route"],
                               "val": level_check(check["full"][0], check["route"][0], lv["val"]),
                               "test": level_check(check["full"][1], check["route"][1], lv["test"])}
    model.load_state_dict(start)
    train_dense(ddp, data, ctx, epochs, s["lr"]["routes"], "fixed route", best["route"])
    recalibrate_route(ddp, data.train, ctx, best["route"], batches=len(data.train))
    save_like(ckpt, model, os.path.join(d, "fixed.pt"), fixed_route=best["route"])
    vc, _ = per_image(ddp, data.eval, "open", best["route"])
    tc, _ = per_image(ddp, data.test, "open", best["route"])
    out["fixed"] = {"val": bits(vc), "test": bits(tc), "route": best["route"], "gflops": best["flops"] / 1e9}
    out.update(level_router(s, ddp, data, ctx, costs, start, rows, target, epochs, lv))
    write_json(os.path.join(d, "finish.json"), out)


def level_router(s, ddp, data, ctx, costs, start, rows, target, epochs, lv):
    """The level-router diagnostic (it reads the difficulty labels) from the weights `start`: as is and
    fine-tuned `epochs` on its routes; {} if no assignment fits the budget."""
    model = unwrap(ddp)
    routes = level_routes(rows, lv["val"], target)
    if routes is None:
        return {}
    out = {}
    for key, ft in (("level", False), ("level_ft", True)):
        model.load_state_dict(start)
        if ft:
            y2 = data.train.y + data.num_classes * torch.as_tensor(lv["train"], device=data.train.y.device)
            tl = loader_of(data.train.x, y2, data.train.batch_size, ctx, data.pipeline, True, data.train.seed,
                           data.pipeline["augment"])
            opt = sgd([p for n, p in model.named_parameters() if not is_switch(n)], s["lr"]["routes"], 0.9, 5e-4)
            sched = make_scheduler(opt, "cosine", epochs, len(tl))
            step = LevelRouted(routes, data.num_classes)
            for epoch in range(epochs):
                tl.set_epoch(epoch)
                train_epoch(ddp, tl, opt, sched, step, ctx, epoch, desc="level router")
        vc, tc = level_router_eval(ddp, data, ctx, routes, lv["train"], lv["val"], lv["test"])
        cost = np.array([route_flops(costs, routes[int(x)]) for x in lv["test"]]) / 1e9
        out[key] = {"val": bits(vc), "test": bits(tc), "gflops": float(cost.mean()),
                    "routes": {str(kk): r for kk, r in routes.items()}}
    model.load_state_dict(start)
    return out


def collect_step(s, w, u, ctx, args):
    """A finished unit's small result: per-image validation and test correctness of every arm (and the static
    curve), with their GFLOPs and epochs -> <results>/units/<unit>[-x2].json."""
    r = arm_root(u, args.factor)
    name = os.path.basename(os.path.normpath(u))

    def open_arm(path, epochs):
        ddp, data, costs, _ = load_unit(w, path, ctx)
        vc, _ = per_image(ddp, data.eval, "open")
        tc, _ = per_image(ddp, data.test, "open")
        return {"val": bits(vc), "test": bits(tc), "gflops": dense_flops(costs) / 1e9, "epochs": epochs}

    res = {"unit": name, "seed": w.seed, "controller": w.controller, "factor": args.factor,
           "scale": {k: v for k, v in s.items() if k != "name"} | {"name": s["name"]},
           "sp_epochs": s["sp"]["epochs"], "unpruned_gflops": unpruned_gflops(u),
           "unpruned": open_arm(os.path.join(r, "dense", "model.pt"), total_epochs(s, args.factor)),
           "budgets": {}}
    budgets = s["budgets"] if args.factor == 1 else (s["double"]["budget"],)
    for b in budgets:
        k = bkey(b)
        d = os.path.join(r, k)
        fin = read_json(os.path.join(d, w.controller, "finish.json"))
        entry = {"fraction": b, **{kk: v for kk, v in read_json(os.path.join(u, k, "budget.json")).items()},
                 "static": open_arm(os.path.join(d, "static", "prune", "checkpoint.pt"), total_epochs(s, args.factor)),
                 **fin}
        entry["dynamic_stage2_gflops"] = read_json(os.path.join(d, "prune", "metrics.json")).get("dense_gflops")
        res["budgets"][k] = entry
        res["test_ids"], res["val_ids"] = fin["test_ids"], fin["val_ids"]
        for kk in ("test_ids", "val_ids"):
            entry.pop(kk)
    if args.factor == 1:
        res["curve"] = []
        for f in s["curve"]:
            a = open_arm(os.path.join(u, "curve", f"f{f:.3f}", "prune", "checkpoint.pt"), total_epochs(s))
            res["curve"].append({"fraction": f, **a})
    write_json(unit_result(args.results, name, w.controller, args.factor), res)


# ------------------------------------------------------------------------------------------ wall-clock

def speed_step(s, w, u, ctx, args):
    """Wall-clock of the trained networks of one unit at every compared budget: the dynamic network (its
    switches deciding per image), static pruning at the same GFLOPs and the unpruned network, exported by
    deploy/export.py; batch 128 and batch 1 (32 images one at a time), eager PyTorch and onnxruntime, all
    taking turns round after round in one process (medians, and the ratios within each round's medians)."""
    from deploy.export import export, onnx_session

    torch.set_num_threads(args.threads)
    out = {"unit": os.path.basename(os.path.normpath(u)), "threads": args.threads, "budgets": {}}
    for b in s["budgets"]:
        k = bkey(b)
        d = os.path.join(u, k)
        paths = {"dynamic": (os.path.join(d, w.controller, "dynamic.pt"), "hard"),
                 "static": (os.path.join(d, "static", "prune", "checkpoint.pt"), "open"),
                 "unpruned": (os.path.join(u, "dense", "model.pt"), "open")}
        nets, onnx = {}, {}
        x_u8 = None
        for name, (path, mode) in paths.items():
            ex = os.path.join(d, "export", name)
            if not os.path.isfile(os.path.join(ex, "export.json")):
                export(path, ex, mode=mode)
            model, prep = load_model(path, mode=mode)
            if x_u8 is None:
                from utils.data import load_dataset
                x_u8 = load_dataset(w.data_dir, "png", prep.size).test_x[:128].permute(0, 2, 3, 1).contiguous()
                x_f = prep(x_u8)
            nets[name] = (model, mode)
            onnx[name] = (os.path.join(ex, "model.onnx"),
                          os.path.join(ex, "model_b1.onnx") if mode == "hard" else os.path.join(ex, "model.onnx"))
        sessions = {name: (onnx_session(p128, args.threads), onnx_session(p1, args.threads))
                    for name, (p128, p1) in onnx.items()}

        def eager(name, batch):
            model, mode = nets[name]
            with torch.inference_mode():
                if batch == 128:
                    model(x_f, mode)
                else:
                    for i in range(32):
                        model(x_f[i:i + 1], mode)

        def ort(name, batch):
            if batch == 128:
                sessions[name][0].run(None, {"images": x_u8.numpy()})
            else:
                for i in range(32):
                    sessions[name][1].run(None, {"images": x_u8[i:i + 1].numpy()})

        kinds = [(f"{eng} b{batch}", fn, batch) for eng, fn in (("eager", eager), ("ort", ort)) for batch in (128, 1)]
        times = {(kind, name): [] for kind, _, _ in kinds for name in nets}
        for rep in range(args.reps + 1):  # the first round warms up
            for kind, fn, batch in kinds:
                order = list(nets)
                order = order[rep % len(order):] + order[:rep % len(order)]
                for name in order:
                    t0 = time.perf_counter()
                    fn(name, batch)
                    if rep:
                        times[(kind, name)].append((time.perf_counter() - t0) / (32 if batch == 1 else 128))
        rows = {}
        for kind, _, _ in kinds:
            med = {name: statistics.median(times[(kind, name)]) for name in nets}
            ratio = lambda a, b_: statistics.median(  # noqa: E731
                [x / y for x, y in zip(times[(kind, a)], times[(kind, b_)])])
            rows[kind] = {"ms_per_image": {n: v * 1e3 for n, v in med.items()},
                          "dynamic_over_static": ratio("dynamic", "static"),
                          "dynamic_over_unpruned": ratio("dynamic", "unpruned"),
                          "static_over_unpruned": ratio("static", "unpruned")}
        out["budgets"][k] = {"fraction": b, "gflops": {n: read_json(os.path.join(d, "export", n, "export.json"))[
            "gflops_every_block"] for n in nets}, "timing": rows}
    write_json(os.path.join(args.results, "speed.json"), out)


# ------------------------------------------------------------------------------------------ the report

def load_results(results, controller="counterfactual", factor=1):
    d = os.path.join(results, "units")
    if not os.path.isdir(d):
        return []
    got = []
    for f in sorted(os.listdir(d)):
        if f.endswith(".json") and os.path.basename(unit_result(results, f.split("-")[0].split(".")[0], controller,
                                                                factor)) == f:
            got.append(read_json(os.path.join(d, f)))
    return got


def compare(units, get_a, get_b, split="test", alternative="greater"):
    """Paired comparison pooled over units: McNemar (pairs pooled), a bootstrap over units then images, one
    clustered by image (the trained networks held fixed), and the smallest detectable difference."""
    a = [unbits(get_a(x)[split]) for x in units]
    b = [unbits(get_b(x)[split]) for x in units]
    ids = [np.array(x[f"{split}_ids"]) for x in units]
    rep = stats.pooled_report(a, b, image_ids=ids, alternative=alternative, n_boot=4000)
    ub = stats.unit_bootstrap_ci(a, b, n_boot=4000)
    rep["unit_ci"] = {"low": ub.low, "high": ub.high, "se": ub.se, "mdd": ub.mdd, "units": ub.units}
    return rep


def pooled_acc(units, get, split="test"):
    return float(np.concatenate([unbits(get(x)[split]) for x in units]).mean() * 100)


def knee(curve, key):
    """(ceiling, knee fraction, fraction where the loss reaches 3 points): the knee is the largest budget where
    static pruning loses 1 point or more against the best of its curve (`key`: val_acc or test_acc)."""
    ceiling = max(c[key] for c in curve)
    below1 = [c["fraction"] for c in curve if ceiling - c[key] >= 1]
    below3 = [c["fraction"] for c in curve if ceiling - c[key] >= 3]
    return ceiling, (max(below1) if below1 else None), (max(below3) if below3 else None)


def pool_levels(per_unit):
    """Per-level accuracy of the full network and of a route pooled over units (weighted by images), the gap,
    and the hardest level's gap minus the easiest's."""
    levels = sorted({c["level"] for u in per_unit for c in u})
    out = []
    for lv in levels:
        rows = [c for u in per_unit for c in u if c["level"] == lv]
        n = sum(c["images"] for c in rows)
        out.append({"level": lv, "images": n, **{key: sum(c[key] * c["images"] for c in rows) / n
                                                 for key in ("full", "route", "gap")}})
    return {"levels": out, "hard_minus_easy": out[-1]["gap"] - out[0]["gap"]}


def report(s, family, results, images_level, controller="counterfactual"):
    units = load_results(results, controller)
    if not units:
        raise UserError(f"no finished unit in {results}/units yet")
    if images_level is None:  # a dataset of its own: one level
        images_level = np.zeros(max(max(x["test_ids"]) for x in units) + 1, dtype=np.int64)
    r = {"family": family, "controller": controller, "units": len(units), "seeds": sorted({x["seed"] for x in units}),
         "scale": units[0]["scale"], "budgets": {}}
    sc = units[0]["scale"]
    ep = sc["epochs"]
    T = sum(ep.values())
    r["epochs"] = [
        {"arm": "unpruned (fine-tuned, every block)", "phases": f"dense {T}", "total": T},
        {"arm": "static pruning at the budget", "phases": f"stage 2 {T}", "total": T},
        {"arm": "static + dynamic", "phases": f"stage 2 {ep['prune']} + stage 3 {ep['rl']} + greedy routes "
                                              f"{ep['routes']}", "total": T},
        {"arm": "best fixed route", "phases": f"stage 2 {ep['prune']} + stage 3 {ep['rl']} (shared) + fixed route "
                                              f"{ep['routes']}", "total": T},
        {"arm": "level-router (diagnostic)", "phases": f"stage 2 {ep['prune']} + stage 3 {ep['rl']} (shared) + "
                                                       f"level routes {ep['routes']}", "total": T}]
    # the static curve: extra points, the compared budgets' static arms, and the unpruned network at 1.0
    curve = [{"fraction": 1.0, "gflops": float(np.mean([x["unpruned"]["gflops"] for x in units])),
              "val_acc": pooled_acc(units, lambda x: x["unpruned"], "val"),
              "test_acc": pooled_acc(units, lambda x: x["unpruned"])}]
    fractions = sorted({c["fraction"] for x in units for c in x.get("curve", [])} | set(
        units[0]["budgets"][k]["fraction"] for k in units[0]["budgets"]), reverse=True)
    for f in fractions:
        k = bkey(f)
        if k in units[0]["budgets"]:
            get = lambda x, k=k: x["budgets"][k]["static"]  # noqa: E731
        else:
            get = lambda x, f=f: next(c for c in x["curve"] if c["fraction"] == f)  # noqa: E731
        curve.append({"fraction": f, "gflops": float(np.mean([get(x)["gflops"] for x in units])),
                      "val_acc": pooled_acc(units, get, "val"), "test_acc": pooled_acc(units, get)})
    r["curve"] = curve
    ceiling, knee_f, three = knee(curve, "val_acc")
    r["knee"] = {"ceiling_val": ceiling, "knee": knee_f, "loses_3": three, "test": dict(zip(
        ("ceiling", "knee", "loses_3"), knee(curve, "test_acc")))}
    for k in units[0]["budgets"]:
        b = units[0]["budgets"][k]["fraction"]
        g = {arm: float(np.mean([x["budgets"][k][arm]["gflops"] for x in units if arm in x["budgets"][k]]))
             for arm in ("static", "dynamic", "fixed", "level", "level_ft") if arm in units[0]["budgets"][k]}
        e = {"fraction": b, "below_knee": knee_f is not None and b <= knee_f,
             "budget_gflops": float(np.mean([x["budgets"][k]["gflops"] for x in units])), "gflops": g,
             "acc": {arm: pooled_acc(units, lambda x, arm=arm: x["budgets"][k][arm])
                     for arm in g} | {"unpruned": pooled_acc(units, lambda x: x["unpruned"])},
             "val_acc": {arm: pooled_acc(units, lambda x, arm=arm: x["budgets"][k][arm], "val") for arm in g}}
        get = lambda arm, k=k: (lambda x: x["budgets"][k][arm])  # noqa: E731
        e["dynamic_vs_static"] = compare(units, get("dynamic"), get("static"))
        e["dynamic_vs_fixed"] = compare(units, get("dynamic"), get("fixed"))
        e["static_vs_fixed"] = compare(units, get("static"), get("fixed"), alternative="two-sided")
        if "level_ft" in units[0]["budgets"][k]:
            e["level_ft_vs_fixed"] = compare(units, get("level_ft"), get("fixed"))
            e["level_vs_fixed"] = compare(units, get("level"), get("fixed"))
        # the checks of the difficulty, by level: every block against the budget's fixed route, on stage 3's
        # network (validation, the check; test beside it) and on the dynamic arm's stage-2 network (untrained
        # on any route: validation)
        checks = {"stage3_val": [x["budgets"][k]["difficulty_check"]["val"] for x in units],
                  "stage3_test": [x["budgets"][k]["difficulty_check"]["test"] for x in units],
                  "stage2_val": [x["budgets"][k]["level_check"] for x in units]}
        e["difficulty_check"] = {name: pool_levels(lc) for name, lc in checks.items()}
        levels = [c["level"] for c in e["difficulty_check"]["stage3_val"]["levels"]]
        r["levels"] = levels
        ids = [np.array(x["test_ids"]) for x in units]
        byl = []
        for lv in levels:
            fl = [lv_ for x in units for lv_ in x["budgets"][k]["dynamic"]["by_level"] if lv_["level"] == lv]
            n = [int((images_level[i] == lv).sum()) for i in ids]
            w_ = np.array(n, dtype=float)
            byl.append({"level": lv, "gflops": float(np.average([f["gflops"] for f in fl], weights=w_)),
                        "acc": float(np.average([f["acc"] for f in fl], weights=w_))})
        e["dynamic_by_level"] = byl
        e["dynamic_hard_minus_easy_gflops"] = byl[-1]["gflops"] - byl[0]["gflops"]
        e["goal"] = (e["below_knee"] and family == "transform"
                     and e["dynamic_vs_static"]["unit_ci"]["low"] > 0 and e["dynamic_vs_static"]["ci"]["low"] > 0
                     and e["dynamic_vs_fixed"]["unit_ci"]["low"] > 0 and e["dynamic_vs_fixed"]["ci"]["low"] > 0
                     and e["dynamic_vs_static"]["mcnemar"]["p"] < 0.05 and e["dynamic_vs_fixed"]["mcnemar"]["p"] < 0.05)
        r["budgets"][k] = e
    # convergence: each factor of the ladder against its double, validation, on the units that have both
    ladder, k = [], bkey(sc["double"]["budget"])
    at = {1: {x["unit"]: x for x in units}} | {f: {x["unit"]: x for x in load_results(results, controller, f)}
                                               for f in factors(s)}
    for f, f2 in zip((1, *factors(s)), factors(s)):
        pairs = [(at[f][n], at[f2][n]) for n in sorted(at[f2]) if n in at[f]]
        if not pairs:
            continue
        conv = []
        for arm, get in (("unpruned", lambda x: x["unpruned"]), ("static", lambda x: x["budgets"][k]["static"]),
                         ("dynamic", lambda x: x["budgets"][k]["dynamic"]),
                         ("fixed", lambda x: x["budgets"][k]["fixed"])):
            once = [unbits(get(a)["val"]) for a, _ in pairs]
            twice = [unbits(get(d)["val"]) for _, d in pairs]
            ub = stats.unit_bootstrap_ci(twice, once, n_boot=4000)
            conv.append({"arm": arm, "units": len(pairs), "images": int(sum(len(o) for o in once)),
                         "val_acc": float(np.concatenate(once).mean() * 100),
                         "val_acc_doubled": float(np.concatenate(twice).mean() * 100), "diff": ub.diff,
                         "ci": [ub.low, ub.high], "converged": abs(ub.diff) < CONVERGED})
        ladder.append({"factor": f, "doubled": f2, "epochs": f * T, "arms": conv})
    # the arms on test at each factor of the ladder (the units that have it and every factor below it: a
    # ladder cut short keeps its finished steps whole): how the verdict moves with training
    by_epochs, names = [], set(at[1])
    for f in (1, *factors(s)):
        names &= set(at[f])
        if not names:
            break
        xs = [at[f][n] for n in sorted(names)]
        arm = {a: (lambda x, a=a: x["budgets"][k][a]) for a in ("static", "dynamic", "fixed")}
        by_epochs.append({"factor": f, "epochs": f * T, "units": len(xs),
                          "unpruned": pooled_acc(xs, lambda x: x["unpruned"]),
                          **{a: pooled_acc(xs, g) for a, g in arm.items()},
                          "dynamic_vs_static": compare(xs, arm["dynamic"], arm["static"]),
                          "dynamic_vs_fixed": compare(xs, arm["dynamic"], arm["fixed"])})
    if ladder:
        # the verdict's step: the first whose doubling moves every arm by under CONVERGED on validation
        done = [step["epochs"] for step in ladder if all(a["converged"] for a in step["arms"])]
        r["convergence"] = {"budget": sc["double"]["budget"], "ladder": ladder, "test_by_epochs": by_epochs,
                            "verdict_epochs": done[0] if done else None}
    # other controllers through the same protocol: validation only
    others = {}
    for f in sorted(os.listdir(os.path.join(results, "units"))):
        parts = f[:-5].split("-")
        if f.endswith(".json") and len(parts) == 2 and not parts[1].startswith("x"):
            others.setdefault(parts[1], []).append(read_json(os.path.join(results, "units", f)))
    if others:
        r["controllers_on_val"] = {}
        for ctl, xs in [(controller, units), *others.items()]:
            names = {x["unit"] for x in xs}
            r["controllers_on_val"][ctl] = {
                k: {"units": len(names), "val_acc": pooled_acc(xs, lambda x, k=k: x["budgets"][k]["dynamic"], "val"),
                    "val_gflops": float(np.mean([x["budgets"][k]["dynamic"]["val_gflops"] for x in xs]))}
                for k in units[0]["budgets"]}
    sp = os.path.join(results, "speed.json")
    if os.path.isfile(sp):
        r["speed"] = read_json(sp)
    return r


def _c(c, key="unit_ci"):
    u = c[key]
    return f"[{u['low']:+.2f}, {u['high']:+.2f}]"


def markdown(r, command):
    quick = r["scale"]["name"] == "quick"
    title = {"transform": "digits under a graded transformation (compute can fix it)",
             "noise": "digits under graded noise (destroys information)",
             "own": "a dataset's own test split"}[r["family"]]
    L = [f"# What the switches add, deconfounded: {title}" + (" (quick scale)" if quick else ""), ""]
    if quick:
        L += ["The quick scale is a smoke run of the code path: its numbers say nothing about the switches.", ""]
    sc = r["scale"]
    design = f"{sc['folds']} folds x seeds {r['seeds']}" if r["family"] != "own" else f"seeds {r['seeds']}"
    L += [f"{r['units']} units ({design}), ResNet-{sc['depth']} width {sc['width']} at "
          f"{sc['resize']}x{sc['resize']}, stage 3's controller `{r['controller']}`"
          f"{' (its full form: every gated block flipped per step)' if r['controller'] == 'counterfactual' else ''}, "
          f"crop augmentation. "
          f"Reproduce: `{command}`.", "",
          "## Epochs after stage 1 (every arm; stage 1: "
          f"{sc['sp']['epochs']} epochs, shared)", "", "| arm | phases (epochs, each a cosine schedule) | total |",
          "|---|---|---|"]
    L += [f"| {e['arm']} | {e['phases']} | {e['total']} |" for e in r["epochs"]]
    if "convergence" in r:
        c = r["convergence"]
        L += ["", f"## Convergence: every phase's epochs doubled (budget {c['budget']}, validation)", "",
              "| epochs after stage 1 | arm | val acc | doubled | change (points) | 95% CI (units, then images) | "
              "units, images | under 0.3? |", "|---|---|---|---|---|---|---|---|"]
        for step in c["ladder"]:
            for a in step["arms"]:
                L.append(f"| {step['epochs']} -> {2 * step['epochs']} | {a['arm']} | {a['val_acc']:.2f} | "
                         f"{a['val_acc_doubled']:.2f} | {a['diff']:+.2f} | [{a['ci'][0]:+.2f}, {a['ci'][1]:+.2f}] | "
                         f"{a['units']}, {a['images']} | {'yes' if a['converged'] else 'no'} |")
        if c.get("test_by_epochs"):
            ci = lambda e: (f"{e['diff']:+.2f} [{e['unit_ci']['low']:+.2f}, {e['unit_ci']['high']:+.2f}], "
                            f"p {e['mcnemar']['p']:.3g}")
            L += ["", "The same budget on test, by epochs after stage 1 (pooled over the units that reached the step "
                      "and every step below it; differences with their 95% CI over units, then images, and McNemar's "
                      "one-sided p):", "",
                  "| epochs | units | unpruned | static | static + dynamic | fixed route | dyn - static | "
                  "dyn - fixed |",
                  "|---|---|---|---|---|---|---|---|"]
            for e in c["test_by_epochs"]:
                L.append(f"| {e['epochs']} | {e['units']} | {e['unpruned']:.2f} | {e['static']:.2f} | "
                         f"{e['dynamic']:.2f} | {e['fixed']:.2f} | {ci(e['dynamic_vs_static'])} | "
                         f"{ci(e['dynamic_vs_fixed'])} |")
            L += ["", f"The verdict is read at the first step whose doubling moves every arm by under {CONVERGED} "
                      f"points on validation: {c['verdict_epochs']} epochs." if c["verdict_epochs"] else
                      f"No step of the ladder moves every arm by under {CONVERGED} points on validation yet: each "
                      "row above ranks arms still improving, and none is the verdict."]
    kn = r["knee"]
    L += ["", "## Static pruning: where the budget binds", "",
          "| fraction of unpruned GFLOPs | GFLOPs | val acc | test acc | val loss vs ceiling |",
          "|---|---|---|---|---|"]
    for c in r["curve"]:
        L.append(f"| {c['fraction']:.3f} | {c['gflops']:.5f} | {c['val_acc']:.2f} | {c['test_acc']:.2f} | "
                 f"{kn['ceiling_val'] - c['val_acc']:+.2f} |")
    L += ["", f"Ceiling (validation) {kn['ceiling_val']:.2f}%. Knee (largest budget losing >= 1 point on validation): "
              f"{kn['knee'] if kn['knee'] is not None else 'none on this curve'}; loses >= 3 points at "
              f"{kn['loses_3'] if kn['loses_3'] is not None else 'no budget of this curve'} "
              f"(on test: knee {kn['test']['knee']}, 3 points at {kn['test']['loses_3']})."]
    L += ["", "## At each compared budget (test, pooled over units)", "",
          "| budget | below knee | GFLOPs | unpruned | static | static + dynamic | fixed route | level-router (as is / "
          "fine-tuned) |", "|---|---|---|---|---|---|---|---|"]
    for k, e in r["budgets"].items():
        a, g = e["acc"], e["gflops"]
        lvl = f"{a['level']:.2f} / {a['level_ft']:.2f} ({g['level_ft']:.5f})" if "level_ft" in a else "-"
        L.append(f"| {e['fraction']:.3f} | {'yes' if e['below_knee'] else 'no'} | {e['budget_gflops']:.5f} | "
                 f"{a['unpruned']:.2f} | {a['static']:.2f} ({g['static']:.5f}) | {a['dynamic']:.2f} "
                 f"({g['dynamic']:.5f}) | {a['fixed']:.2f} ({g['fixed']:.5f}) | {lvl} |")
    L += ["", "| budget | comparison | diff | 95% CI, units then images | 95% CI, images | McNemar p | A only / B only "
              "| detectable (80%) |", "|---|---|---|---|---|---|---|---|"]
    for k, e in r["budgets"].items():
        for key, label in (("dynamic_vs_static", "dynamic - static"), ("dynamic_vs_fixed", "dynamic - fixed route"),
                           ("static_vs_fixed", "static - fixed route"),
                           ("level_vs_fixed", "level-router as is - fixed route (diagnostic)"),
                           ("level_ft_vs_fixed", "level-router fine-tuned - fixed route (diagnostic)")):
            if key not in e:
                continue
            c = e[key]
            side = "one-sided" if c["mcnemar"]["alternative"] == "greater" else "two-sided"
            L.append(f"| {e['fraction']:.3f} | {label} | {c['diff']:+.2f} | {_c(c)} | {_c(c, 'ci')} | "
                     f"{c['mcnemar']['p']:.3g} ({side}) | {c['mcnemar']['only_a']} / {c['mcnemar']['only_b']} | "
                     f"{c['unit_ci']['mdd']:.2f} (units) / {c['power']['mdd']:.2f} (images) |")
    L += ["", "Detectable: the smallest difference a two-sided test at 5% finds with 80% power, from the bootstrap "
              "over units then images (2.8 x its standard error) and from McNemar's discordance over the distinct "
              "images. McNemar pools every unit's pairs (exact for one seed, optimistic over several: the "
              "bootstrap over units is the interval to quote).", "",
          "## Difficulty: what compute can fix, and where the switches spend it", "",
          "The check: how much more the network gets right with every block than on the budget's fixed route, by "
          "difficulty level (0 easiest; points, pooled over units). On stage 3's network (trained on sampled "
          "routes), BN re-estimated for each, validation (test beside it); and on the dynamic arm's stage-2 "
          "network, whose blocks never learnt to be skipped (validation):", "",
          "| budget | network, split | " + " | ".join(f"L{lv}" for lv in r["levels"]) + " | hardest - easiest |",
          "|---|---|" + "---|" * (len(r["levels"]) + 1)]
    for k, e in r["budgets"].items():
        for name, label in (("stage3_val", "stage 3, val"), ("stage3_test", "stage 3, test"),
                            ("stage2_val", "stage 2, val")):
            c = e["difficulty_check"][name]
            L.append(f"| {e['fraction']:.3f} | {label} | " + " | ".join(f"{x['gap']:+.2f}" for x in c["levels"])
                     + f" | {c['hard_minus_easy']:+.2f} |")
    L += ["", "The dynamic network's GFLOPs and accuracy by level (test):", ""]
    for k, e in r["budgets"].items():
        L.append(f"- budget {e['fraction']:.3f}: " + ", ".join(
            f"L{c['level']} {c['gflops'] * 1e3:.3f} M / {c['acc']:.1f}%" for c in e["dynamic_by_level"])
            + f"; hardest minus easiest {e['dynamic_hard_minus_easy_gflops'] * 1e3:+.3f} MFLOPs")
    L += ["", "## Verdict per budget", ""]
    for k, e in r["budgets"].items():
        ds, df = e["dynamic_vs_static"], e["dynamic_vs_fixed"]
        head = ("headroom: the level-router fine-tuned beats the fixed route" if "level_ft_vs_fixed" in e and
                e["level_ft_vs_fixed"]["unit_ci"]["low"] > 0 else
                "no routing headroom shown: the level-router fine-tuned does not beat the fixed route"
                if "level_ft_vs_fixed" in e else "no level-router")
        L.append(f"- {e['fraction']:.3f} ({'below' if e['below_knee'] else 'above'} the knee): dynamic - static "
                 f"{ds['diff']:+.2f} {_c(ds)}, dynamic - fixed {df['diff']:+.2f} {_c(df)}; {head}"
                 + (f" ({e['level_ft_vs_fixed']['diff']:+.2f} {_c(e['level_ft_vs_fixed'])})"
                    if "level_ft_vs_fixed" in e else "") + f"; goal {'met' if e['goal'] else 'not met'}.")
    if "controllers_on_val" in r:
        L += ["", "## Controllers (validation only: the same units, stage-2 networks and budgets)", "",
              "| controller | budget | units | val acc | val GFLOPs |", "|---|---|---|---|---|"]
        for ctl, v in r["controllers_on_val"].items():
            for k, e in v.items():
                L.append(f"| {ctl} | {k[1:]} | {e['units']} | {e['val_acc']:.2f} | {e['val_gflops']:.5f} |")
    if "speed" in r:
        sp = r["speed"]
        L += ["", f"## Wall-clock (unit {sp['unit']}, {sp['threads']} thread(s), medians of rounds taking turns)", "",
              "| budget | engine, batch | ms/image dynamic / static / unpruned | dynamic / static | "
              "dynamic / unpruned |",
              "|---|---|---|---|---|"]
        for k, e in sp["budgets"].items():
            for kind, t in e["timing"].items():
                m = t["ms_per_image"]
                L.append(f"| {e['fraction']:.3f} | {kind} | {m['dynamic']:.3f} / {m['static']:.3f} / "
                         f"{m['unpruned']:.3f} | "
                         f"{t['dynamic_over_static']:.2f} | {t['dynamic_over_unpruned']:.2f} |")
    return "\n".join(L) + "\n"


# -------------------------------------------------------------------------------------------- main

STEPS = {"targets": targets_step, "dense": dense_step_, "budget": budget_step, "finish": finish_step,
         "collect": collect_step, "speed": speed_step}


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", default="all", choices=("all", "report", *STEPS),
                   help="all (default): every unit not finished yet, then the report; report: the report of the "
                        "finished units; the others are one unit's steps (run by all)")
    p.add_argument("unit", nargs="?", help="a unit's folder (the one-unit steps)")
    p.add_argument("--family", default="transform", choices=FAMILIES,
                   help="the difficulty of the digits (ignored with --data_dir)")
    p.add_argument("--data_dir", default=None, help="a dataset with its own test split instead of the digits' "
                   "folds (class folders or CIFAR-100's pickles; --scale cifar100): one unit per seed")
    p.add_argument("--scale", default="digits", choices=sorted(SCALES))
    p.add_argument("--quick", action="store_true", help="--scale quick")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--controller", default="counterfactual",
                   help="stage 3's --controller for the dynamic arm (compared with others on validation only)")
    p.add_argument("--out", default=None, help="the work (default: evaluation/out/crossfit/<family>; with --quick, "
                   "evaluation/out/crossfit-quick/<family>, never the full run's)")
    p.add_argument("--results", default=None, help="default: evaluation/results/crossfit/<family>; with --quick, "
                   "<out>/results, never over the full run's")
    p.add_argument("--budget", type=float, default=None, help="one unit's steps: the budget (fraction)")
    p.add_argument("--factor", type=int, default=1, help="one unit's steps: the epochs' factor (2: doubled)")
    p.add_argument("--redo", default=None, choices=("level",),
                   help="finish: the level-router diagnostic alone, again, for a unit already finished")
    p.add_argument("--speed", action="store_true", help="also time the trained networks of the first unit")
    p.add_argument("--reps", type=int, default=15, help="rounds of the wall-clock timing")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    s = {**SCALES["quick" if args.quick else args.scale], "name": "quick" if args.quick else args.scale}
    if args.seeds:
        s["seeds"] = tuple(args.seeds)
    if args.step in STEPS:
        if not args.unit:
            p.error(f"{args.step} needs a unit folder")
        if args.step in ("budget", "finish") and args.budget is None:
            p.error(f"{args.step} needs --budget")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        w = unit_where(s, args.unit, args.controller)
        ctx = setup(s["device"], w.seed)
        STEPS[args.step](s, w, args.unit, ctx, args)
        return
    quick = s["name"] == "quick"
    if args.data_dir:
        args.family = "own"
    out = args.out or os.path.join(ROOT, "evaluation", "out", "crossfit-quick" if quick else "crossfit", args.family)
    if args.out:
        out = os.path.join(args.out, args.family)
    results = args.results or (os.path.join(out, "results") if quick else
                               os.path.join(ROOT, "evaluation", "results", "crossfit", args.family))
    if args.results:
        results = os.path.join(args.results, args.family)
    units = write_units(s, args.family, out, args.data_dir)
    failed = None
    if args.step == "all":
        tasks = plan(s, units, out, args.controller, results)
        if args.speed:
            first = os.path.join(out, units[0][0])
            tasks.append(Task(f"{units[0][0]}/speed", ["-m", "evaluation.crossfit", "speed", first,
                                                       "--scale", s["name"], "--controller", args.controller,
                                                       "--results", results, "--reps", str(args.reps)],
                              os.path.join(results, "speed.json"),
                              [t.name for t in tasks if t.name.startswith(units[0][0] + "/") and "/x" not in t.name
                               and not t.name.endswith("/collect")]))
        try:
            run_all(tasks, args.jobs, args.threads, os.path.join(out, "logs"))
        except RuntimeError as e:  # the units that finished are reported on all the same
            print(f"[crossfit] {e}", flush=True)
            failed = str(e)
    level = levels_of(os.path.join(out, "unit"), None)
    r = report(s, args.family, results, level, args.controller)
    given = argv if argv is not None else sys.argv[1:]
    if args.step == "report":  # the command that runs the units reported on
        given = [*(["--quick"] if quick else []), *(["--scale", args.scale] if args.scale != "digits" and not quick
                                                     else []),
                 *(["--data_dir", args.data_dir] if args.data_dir else ["--family", args.family]),
                 *(["--controller", args.controller] if args.controller != "counterfactual" else []), "--speed"]
    command = " ".join(["python -m evaluation.crossfit", *given])
    write_json(os.path.join(results, "report.json"), r)
    with open(os.path.join(results, "report.md"), "w") as f:
        f.write(markdown(r, command))
    print(markdown(r, command), flush=True)
    if failed:
        raise SystemExit(f"[crossfit] some tasks failed (their units are not in the report): {failed[:500]}")


if __name__ == "__main__":
    run_main(main)
