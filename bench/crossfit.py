"""What the switches add, measured with power: cross-fitted evaluation of per-image routing on all of digits.

Every one of the 1,797 digits is a test image once per seed: for each seed the images are dealt into 5
stratified folds, and for each fold the three stages run on the other four (the stage scripts as a user runs
them, as subprocesses; their validation split, --val_split of those four folds, is where every choice is
made), then the fold is evaluated image by image. 5 folds x 3 seeds = 5,391 paired test predictions.
The images carry a graded difficulty (utils/synthetic.digits_images: 5 levels of contrast and noise), or
none (--data plain: the uniformly easy case, where routing should at least do no harm).

Per fold and seed ("unit"): the budget is fixed before stage 3, as the cost of the best fixed route of the
stage-2 network on validation among the routes at most `budget` (75%) of the way from every gated block
skipped to every block run; stage 3 is trained to that budget (--target_gflops, its switches' FLOPs
counted against it). Then, on the same stage-3 weights unless said otherwise:
  dynamic   the stage-3 network (static + dynamic) as saved, its threshold moved (calibrated on training
            images, as stage 3 does) to the fixed route's GFLOPs, so that both cost the same
  fixed     the best fixed route (the same blocks skipped for every image) among the routes within 1% of
            the budget, chosen on validation, then fine-tuned on that route for as many route epochs as
            stage 3 ends with, BN re-estimated
  equal     static pruning alone pushed to the fixed route's GFLOPs (stage 2 from the stage-1 network, as
            many fine-tuning epochs as stage 2 + stage 3 + route epochs)
  static    the stage-2 network, every block (the row "static pruning only"); unpruned: stage 1, every block
Controls on the dynamic weights: the same routes shuffled across test images (overall, and within difficulty
levels), and a two-route oracle over the routes at the budget within 2 / 5 validation points of the full
network. Curves: the threshold swept over budgets, with the best fixed route (on validation, not fine-tuned)
and static pruning pushed to each budget's GFLOPs (stage 2 from the stage-1 network, the same epochs as
`equal`; at the full budget the stage-2 network). A check of the per-unit FLOPs match: the test fold's own
images (labels unused) set the dynamic threshold to exactly the fixed route's GFLOPs; the comparison is
repeated there (a check of the mismatch only: the main comparison never sees test images before testing).

    python bench/crossfit.py                          # graded digits, 5 folds x 3 seeds (~1.5 h, 2 cores)
    python bench/crossfit.py --data plain --seeds 0   # uniformly easy digits, 5 folds x 1 seed
    python bench/crossfit.py --quick --out DIR --results DIR   # the same code path in a minute

Writes <results>/crossfit-<data>.json (every number, per unit and pooled) and .md (the tables); work under
<out> (default bench/out/crossfit-<data>), reused by a rerun of the same commands (bench/runner.py).
"""
import argparse
import copy
import itertools
import os
import sys
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names
from bench import paired  # noqa: E402
from bench.runner import Task, run_all  # noqa: E402
from gates.ending import CALIBRATION_BATCHES  # noqa: E402
from gates.routes import (best_fixed_route, calibrate_to_flops, evaluate_route, recalibrate_route,  # noqa: E402
                          route_flops)
from runtime.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from runtime.evaluate import no_autotune_when_skipping  # noqa: E402
from utils.cli import Parser  # noqa: E402
from utils.dist import setup  # noqa: E402
from runtime.loop import make_scheduler, prepare, train_epoch  # noqa: E402
from runtime.steps import dense_step  # noqa: E402
from utils.files import read_json, write_json  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.flops import measure_costs, routed_flops, skipped_flops  # noqa: E402
from utils.data import DataSettings, load_data  # noqa: E402
from utils.synthetic import digits_images, write_split  # noqa: E402

# ResNet-20 width 1 on digits at 16x16 (the cost of a unit: about 5 min on one core). `budget`: where the
# budget route may cost at most, between the static network with every gated block skipped and with all run;
# alpha is the price of all gated blocks in cross-entropy units, its start (dual ascent moves it).
SCALES = {
    "digits": dict(resize=16, depth=20, width=1, bs=64, val_split=0.1, folds=5, seeds=(0, 1, 2), levels=5,
                   sp=dict(epochs=15, lr=0.1),
                   prune=dict(compression=0.6, epochs=5, lr=0.02, fisher_batches=16),
                   rl=dict(epochs=12, lr=0.05, rl_weight=0.01, alpha=1.0, route_epochs=6, route_lr=0.02),
                   reinforce=dict(alpha=3.5, gamma=1.0, rl_weight=0.01),  # bench/study.py's stage-3 flags
                   budget=0.75, curve=(0.4, 0.55, 0.7, 0.85, 1.0)),
    "quick": dict(resize=8, depth=8, width=1, bs=32, val_split=0.2, folds=2, seeds=(0,), levels=3,
                  sp=dict(epochs=1, lr=0.05),
                  prune=dict(compression=0.5, epochs=1, lr=0.01, fisher_batches=2),
                  rl=dict(epochs=1, lr=0.01, rl_weight=0.01, alpha=1.0, route_epochs=1, route_lr=0.01),
                  reinforce=dict(alpha=1.0, gamma=1.0, rl_weight=0.01),
                  budget=0.75, curve=(0.5, 1.0), max_images=300),
}
EXHAUSTIVE = 12  # up to this many switches every fixed route is tried; beyond, greedy block removal


# ------------------------------------------------------------------------------------------ the data

def write_units(s, data, out):
    """The images once (images.npz: pixels, labels, difficulty levels), then one data folder per unit:
    <out>/s<seed>f<fold>/data/{train,test}/<class>/<image index>.png, train = the other folds. Returns
    [(name, split)]."""
    levels = s["levels"] if data == "graded" else 0
    images, labels, level = digits_images(s["resize"], seed=0, levels=levels)
    if s.get("max_images"):
        images, labels, level = images[:s["max_images"]], labels[:s["max_images"]], level[:s["max_images"]]
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "images.npz"), labels=labels, level=level)
    units = []
    for split in paired.cross_fit_splits(len(labels), s["folds"], s["seeds"], val_fraction=0.0, labels=labels):
        name = f"s{split.seed}f{split.fold}"
        root = os.path.join(out, name, "data")
        if not os.path.isdir(os.path.join(root, "test")):
            tmp = root + ".partial"
            write_split(tmp, images, labels, split.train, split.test)
            os.replace(tmp, root)
        units.append((name, split))
    return units


def unit_ids(data_dir, split="test"):
    """The image indices of a unit's split in the order the loaders read it (sorted class, then file)."""
    d = os.path.join(data_dir, split)
    return np.array([int(f.split(".")[0]) for c in sorted(os.listdir(d))
                     for f in sorted(os.listdir(os.path.join(d, c)))])


# ------------------------------------------------------------------------------------------ the tasks

def common(s, unit_dir, seed):
    return ["--bs", str(s["bs"]), "--num_workers", "0", "--seed", str(seed), "--device", "cpu",
            "--data_dir", os.path.join(unit_dir, "data"), "--val_split", str(s["val_split"])]


def target_gflops(unit_dir):
    """The stage-3 target: the GFLOPs of the budget route (budget.json), switches included in what the
    dynamic network will be charged."""
    return read_json(os.path.join(unit_dir, "budget.json"))["gflops"]


def curve_budgets(s):
    """The curve's budgets where static pruning is run (at the full budget, the stage-2 network is it)."""
    return [b for b in s["curve"] if b < 1.0]


def static_config(s, u, seed, result_dir, gflops):
    """Stage 2's config for static pruning alone pushed to `gflops` from the stage-1 network, with the ranking
    that counts FLOPs and as many fine-tuning epochs as stage 2 + stage 3 + route epochs."""
    r = s["rl"]
    return {"result_dir": result_dir, "data_dir": os.path.join(u, "data"),
            "checkpoint": os.path.join(u, "sp", "checkpoint.pt"),
            "num_workers": 0, "resize": s["resize"], "prune_mode": "one_pass", "gflops": gflops,
            "epochs": s["prune"]["epochs"] + r["epochs"] + r["route_epochs"], "lr": s["prune"]["lr"],
            "bs": s["bs"], "fisher_batches": s["prune"]["fisher_batches"], "seed": seed, "device": "cpu",
            "val_split": s["val_split"], "round_to": 1, "criterion": "score_per_flop"}


def plan(s, units, out, controller, reinforce_check):
    tasks = []
    for name, split in units:
        u, seed = os.path.join(out, name), split.seed
        cfg = os.path.join(u, "prune_config.json")
        prune = {"result_dir": u, "data_dir": os.path.join(u, "data"), "num_workers": 0, "resize": s["resize"],
                 "prune_mode": "one_pass", "compression": s["prune"]["compression"], "epochs": s["prune"]["epochs"],
                 "lr": s["prune"]["lr"], "bs": s["bs"], "fisher_batches": s["prune"]["fisher_batches"],
                 "seed": seed, "device": "cpu", "val_split": s["val_split"], "round_to": 1, "criterion": "score"}
        r = s["rl"]
        rl = lambda u=u, seed=seed, sub="", ctl=controller, final="test", flags=None: [  # noqa: E731
            "main_rl_prune.py", "--checkpoint", os.path.join(u, "prune", "checkpoint.pt"),
            "--result_dir", os.path.join(u, sub) if sub else u, "--controller", ctl,
            "--target_gflops", repr(target_gflops(u)), "--overwrite", "--epochs", str(r["epochs"]),
            "--lr", repr(r["lr"]),
            *(flags or ["--alpha", repr(r["alpha"]), "--rl_weight", repr(r["rl_weight"])]),
            "--route_epochs", str(r["route_epochs"]), "--route_lr", repr(r["route_lr"]),
            "--final_split", final, *common(s, u, seed)]
        eq_cfg = os.path.join(u, "equal_config.json")
        equal = lambda u=u, seed=seed: static_config(  # noqa: E731
            s, u, seed, os.path.join(u, "equal"), read_json(os.path.join(u, "route.json"))["gflops"])
        me = [os.path.join(ROOT, "bench", "crossfit.py")]
        tasks += [
            Task(f"{name}/sp", ["main_sp.py", "--network", "resnet", "--depth", str(s["depth"]), "--width",
                                str(s["width"]), "--epochs", str(s["sp"]["epochs"]), "--lr", repr(s["sp"]["lr"]),
                                "--resize", str(s["resize"]), "--result_dir", u, *common(s, u, seed)],
                 os.path.join(u, "sp", "metrics.json")),
            Task(f"{name}/prune", ["main_prune.py", "--config_path", cfg], os.path.join(u, "prune", "metrics.json"),
                 [f"{name}/sp"], prune, cfg),
            Task(f"{name}/budget", [*me, "budget", u, "--scale", s["name"]], os.path.join(u, "budget.json"),
                 [f"{name}/prune"]),
            Task(f"{name}/rl", rl, os.path.join(u, "rl", "metrics.json"), [f"{name}/budget"]),
            Task(f"{name}/route", [*me, "route", u, "--scale", s["name"]], os.path.join(u, "route.json"),
                 [f"{name}/rl"]),
            Task(f"{name}/equal", ["main_prune.py", "--config_path", eq_cfg, "--overwrite"],
                 os.path.join(u, "equal", "prune", "metrics.json"), [f"{name}/route"], equal, eq_cfg),
            Task(f"{name}/evaluate", [*me, "evaluate", u, "--scale", s["name"]], os.path.join(u, "eval.json"),
                 [f"{name}/equal"]),
            Task(f"{name}/targets", [*me, "targets", u, "--scale", s["name"]], os.path.join(u, "curve_targets.json"),
                 [f"{name}/prune"])]
        for b in curve_budgets(s):
            cfg_b = os.path.join(u, "curve", f"b{b:.2f}", "config.json")
            tasks.append(Task(f"{name}/static{b:.2f}", ["main_prune.py", "--config_path", cfg_b, "--overwrite"],
                              os.path.join(u, "curve", f"b{b:.2f}", "prune", "metrics.json"), [f"{name}/targets"],
                              lambda u=u, seed=seed, b=b: static_config(
                                  s, u, seed, os.path.join(u, "curve", f"b{b:.2f}"),
                                  read_json(os.path.join(u, "curve_targets.json"))[f"{b:.2f}"]), cfg_b))
        tasks.append(Task(f"{name}/curve", [*me, "curve", u, "--scale", s["name"]], os.path.join(u, "curve.json"),
                          [f"{name}/evaluate", *(f"{name}/static{b:.2f}" for b in curve_budgets(s))]))
        if reinforce_check and seed == s["seeds"][0]:  # SkipNet's controller, on validation only
            q = s["reinforce"]
            tasks.append(Task(f"{name}/reinforce", lambda u=u, seed=seed, q=q: rl(
                u, seed, "reinforce", "reinforce", "val",
                ["--alpha", repr(q["alpha"]), "--gamma", repr(q["gamma"]), "--rl_weight", repr(q["rl_weight"])]),
                os.path.join(u, "reinforce", "rl", "metrics.json"), [f"{name}/budget"]))
            tasks.append(Task(f"{name}/valroutes", [*me, "valroutes", u, "--scale", s["name"]],
                              os.path.join(u, "valroutes.json"), [f"{name}/reinforce", f"{name}/rl"]))
    return tasks


# -------------------------------------------------------------------------------- in-process steps

def unit_where(s, u, args=None):
    """Where a unit's data is and how its stages split it: the digits units of this bench (their folder
    names say the seed), or the flags given (a CIFAR-100 result folder: bench/run_cifar100.sh)."""
    def given(key, default):
        return getattr(args, key, None) if getattr(args, key, None) is not None else default
    name = os.path.basename(os.path.normpath(u))
    seed = int(name[1:].split("f")[0]) if name.startswith("s") and "f" in name[1:] else 0
    return SimpleNamespace(data_dir=given("data_dir", os.path.join(u, "data")),
                           val_split=given("val_split", s["val_split"]),
                           seed=given("seed", seed), bs=given("bs", s["bs"]),
                           route_epochs=given("route_epochs", s["rl"]["route_epochs"]),
                           route_lr=given("route_lr", s["rl"]["route_lr"]), curve=s["curve"], budget=s["budget"])


def load_unit(w, path, ctx):
    """(ddp, data, costs) of a checkpoint, with the unit's data and validation split (w: unit_where)."""
    ckpt = load_checkpoint(path, None, "checkpoint")
    settings = DataSettings(data_dir=w.data_dir, bs=w.bs, val_split=w.val_split, seed=w.seed)
    data = load_data(settings, ctx, recorded=ckpt.get("pipeline"), source=f"checkpoint {path}")
    if data.eval_name != "val":
        raise UserError(f"{w.data_dir}: the fixed route is chosen on a validation split: give --val_split > 0")
    model, ddp = prepare(model_from_checkpoint(ckpt, path, "checkpoint"), ctx)
    return ddp, data, measure_costs(model, data.image_size)


@torch.no_grad()
def per_image(ddp, loader, mode="hard", route=None):
    """Correctness, cross-entropy and the 0/1 route (N, S) of every image of `loader`, in order; `route`:
    a fixed route in `open` mode (None: every block)."""
    model = getattr(ddp, "module", ddp)
    model.eval()
    saved, model.route = model.route, None if route is None else list(route)
    correct, loss, routes = [], [], []
    try:
        with no_autotune_when_skipping(model, mode):
            for x, y in loader:
                logits, a, _ = model(x, mode)
                correct.append((logits.argmax(1) == y).cpu())
                loss.append(F.cross_entropy(logits.float(), y, reduction="none").cpu())
                routes.append(a.cpu())
    finally:
        model.route = saved
    return torch.cat(correct).numpy(), torch.cat(loss).numpy(), torch.cat(routes).numpy().astype(np.int8)


def all_routes(costs, budget_flops, low=0.0):
    """Every 0/1 route over the gated blocks costing between low and budget_flops (no switch evaluated)."""
    s = len(costs["blocks"])
    return [list(r) for r in itertools.product((0, 1), repeat=s) if low <= route_flops(costs, r) <= budget_flops]


def best_route(ddp, data, ctx, costs, budget_flops, low=0.0):
    """The best fixed route costing at most budget_flops (and at least `low`) on validation: every route
    tried (accuracy, then loss) up to EXHAUSTIVE switches, beyond that gates.routes.best_fixed_route's
    greedy block removal (no lower bound)."""
    if len(costs["blocks"]) > EXHAUSTIVE:
        route = best_fixed_route(ddp, data.eval, ctx, costs, budget_flops / 1e9)["route"]
        return route, evaluate_route(ddp, data.eval, ctx, costs, route)
    best = None
    for r in all_routes(costs, budget_flops, low):
        ev = evaluate_route(ddp, data.eval, ctx, costs, r)
        key = (ev["acc"], -ev["loss"])
        if best is None or key > best[0]:
            best = (key, r, ev)
    return best[1], best[2]


def calibration_batches(data):
    data.plain_train.set_epoch(0)
    return [b for _, b in zip(range(CALIBRATION_BATCHES), data.plain_train)]


def budget_step(w, u, ctx):
    """The GFLOPs budget of the unit, fixed before stage 3: the cost of the best fixed route of the stage-2
    network (on validation) among the routes at most `budget` of the way from every gated block skipped
    to every block run. A route's cost, so that the best fixed route can be compared at exactly it; stage
    3 is then trained to it (--target_gflops), its switches' FLOPs included."""
    ddp, data, costs = load_unit(w, os.path.join(u, "prune", "checkpoint.pt"), ctx)
    limit = costs["base"] + w.budget * sum(costs["blocks"])
    route, val = best_route(ddp, data, ctx, costs, limit)
    write_json(os.path.join(u, "budget.json"), {"route": route, "gflops": route_flops(costs, route) / 1e9,
                                               "val_acc": val["acc"], "limit_gflops": limit / 1e9})


def route_step(w, u, ctx):
    """The fixed-route comparator: the best route on validation of the stage-3 weights among the routes
    within 1% of the stage-3 budget (its --target_gflops; without one, at most what its routes cost on
    validation, by greedy block removal beyond EXHAUSTIVE switches), fine-tuned on that route for the
    route epochs, BN re-estimated under it (fixed.pt, route.json)."""
    rl = read_json(os.path.join(u, "rl", "metrics.json"))
    ddp, data, costs = load_unit(w, os.path.join(u, "rl", "checkpoint.pt"), ctx)
    if rl.get("target_gflops"):
        target = rl["target_gflops"] * 1e9
    else:
        _, _, a = per_image(ddp, data.eval)
        target = routed_flops(costs, torch.as_tensor(a)).mean().item()
    route, val = best_route(ddp, data, ctx, costs, target * 1.01,
                            low=target * 0.99 if rl.get("target_gflops") else 0.0)
    flops = route_flops(costs, route)
    model = getattr(ddp, "module", ddp)
    model.route = route
    backbone = [p for n, p in model.named_parameters() if not n.startswith("switches.")]
    opt = torch.optim.SGD(backbone, lr=w.route_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = make_scheduler(opt, "cosine", w.route_epochs, len(data.train))
    for epoch in range(w.route_epochs):
        data.train.set_epoch(epoch)
        train_epoch(ddp, data.train, opt, sched, dense_step, ctx, epoch, desc="fixed route")  # open mode: the route
    recalibrate_route(ddp, data.train, ctx, route, batches=len(data.train))
    model.route = None
    torch.save({"model": model.state_dict()}, os.path.join(u, "fixed.pt"))
    write_json(os.path.join(u, "route.json"), {"route": route, "gflops": flops / 1e9, "val_acc_before": val["acc"],
                                              "target_gflops": target / 1e9})


def evaluate_step(w, u, ctx):
    """Everything per test image of the unit -> eval.npz (arrays) and eval.json (summaries)."""
    route = read_json(os.path.join(u, "route.json"))
    summary = {"route": route}
    # dynamic: as saved, then at the fixed route's GFLOPs (calibrated on training images, as stage 3 does)
    ddp, data, costs = load_unit(w, os.path.join(u, "rl", "checkpoint.pt"), ctx)
    # image indices: the digits units name their files by them; elsewhere the test split's own order
    ids = unit_ids(w.data_dir) if w.data_dir == os.path.join(u, "data") else np.arange(len(data.test.y))
    out = {"ids": ids}
    model = getattr(ddp, "module", ddp)
    original = copy.deepcopy(model.state_dict())
    c, loss, a = per_image(ddp, data.test)
    summary["dynamic_as_saved"] = {"acc": c.mean() * 100,
                                   "gflops": routed_flops(costs, torch.as_tensor(a)).mean().item() / 1e9}
    batches = calibration_batches(data)
    summary["dynamic_shift"] = calibrate_to_flops(ddp, batches, ctx, costs, route["gflops"] * 1e9)
    out["dyn_correct"], out["dyn_loss"], out["dyn_routes"] = per_image(ddp, data.test)
    out["dyn_flops"] = routed_flops(costs, torch.as_tensor(out["dyn_routes"])).numpy()
    _, _, val_routes = per_image(ddp, data.eval)
    summary["val_distinct_routes"] = len(np.unique(val_routes, axis=0))
    summary["test_distinct_routes"] = len(np.unique(out["dyn_routes"], axis=0))
    # controls on the same weights: the dynamic network's distinct test routes, each on every test image
    distinct, assign = paired.route_table(out["dyn_routes"])
    out["ctl_correct"] = np.stack([per_image(ddp, data.test, "open", r)[0] for r in distinct], 1)
    out["ctl_assign"] = assign
    # oracle candidates: every route at the budget, val accuracy and test correctness
    full_val = evaluate_route(ddp, data.eval, ctx, costs, None)["acc"]
    if len(costs["blocks"]) <= EXHAUSTIVE:
        cands = all_routes(costs, route["target_gflops"] * 1e9 * 1.01)
    else:  # too many routes to try: the 64 the dynamic network uses most, within the budget
        used = sorted(range(len(distinct)), key=lambda k: -(assign == k).sum())
        cands = [list(distinct[k]) for k in used
                 if route_flops(costs, distinct[k]) <= route["target_gflops"] * 1.01e9][:64]
    out["orc_val"] = np.array([evaluate_route(ddp, data.eval, ctx, costs, r)["acc"] / 100 for r in cands])
    out["orc_correct"] = np.stack([per_image(ddp, data.test, "open", r)[0] for r in cands], 1)
    summary["full_val_acc"] = full_val
    # curves: the threshold swept over budgets; the best fixed route at each (selected on val, not fine-tuned)
    low, span = costs["base"], sum(costs["blocks"])
    curve = []
    for b in w.curve:
        g = skipped_flops(costs) + b * span
        model.load_state_dict(original)
        calibrate_to_flops(ddp, batches, ctx, costs, g)
        dc, _, da = per_image(ddp, data.test)
        model.load_state_dict(original)
        fr, _ = best_route(ddp, data, ctx, costs, low + b * span)
        fc = per_image(ddp, data.test, "open", fr)[0]
        curve.append({"budget": b, "dyn_acc": dc.mean() * 100,
                      "dyn_gflops": routed_flops(costs, torch.as_tensor(da)).mean().item() / 1e9,
                      "fixed_acc": fc.mean() * 100, "fixed_gflops": route_flops(costs, fr) / 1e9})
    summary["curve"] = curve
    # the fixed route, fine-tuned (route_step)
    model.load_state_dict(torch.load(os.path.join(u, "fixed.pt"), weights_only=True)["model"])
    out["fix_correct"], out["fix_loss"], _ = per_image(ddp, data.test, "open", route["route"])
    # static at equal GFLOPs, static (stage 2) and unpruned (stage 1), every block
    for key, path in (("equal", os.path.join(u, "equal", "prune", "checkpoint.pt")),
                      ("static", os.path.join(u, "prune", "checkpoint.pt")),
                      ("unpruned", os.path.join(u, "sp", "checkpoint.pt"))):
        d2, data2, costs2 = load_unit(w, path, ctx)
        out[f"{key}_correct"], out[f"{key}_loss"], _ = per_image(d2, data2.test, "open")
        summary[f"{key}_gflops"] = route_flops(costs2, [1] * len(costs2["blocks"])) / 1e9
    summary["fixed_gflops"] = route["gflops"]
    summary["dyn_gflops"] = float(out["dyn_flops"].mean() / 1e9)
    calibrations = read_json(os.path.join(u, "rl", "metrics.json"))["ending"].get("calibration") or [{"shift": 0.0}]
    summary["calibration_shift_last"] = calibrations[-1]["shift"]  # 0: no target, no calibration
    np.savez(os.path.join(u, "eval.npz"), **out)
    write_json(os.path.join(u, "eval.json"), _plain(summary))


def targets_step(w, u, ctx):
    """The GFLOPs of each curve budget, as evaluate_step sweeps them (every gated block skipped plus the
    budget's share of the gated FLOPs; the stage-2 network's costs, which stage 3 keeps): static pruning is
    pushed to them."""
    _, _, costs = load_unit(w, os.path.join(u, "prune", "checkpoint.pt"), ctx)
    span = sum(costs["blocks"])
    write_json(os.path.join(u, "curve_targets.json"),
               {f"{b:.2f}": (skipped_flops(costs) + b * span) / 1e9 for b in w.curve})


def curve_step(w, u, ctx):
    """Static pruning at each curve budget on test (curve.json), and the FLOPs-match check: the dynamic
    network's threshold set on this unit's test images (labels unused) to the fixed route's GFLOPs within
    0.1%, its per-image test results (curve.npz)."""
    route = read_json(os.path.join(u, "route.json"))
    ddp, data, costs = load_unit(w, os.path.join(u, "rl", "checkpoint.pt"), ctx)
    shift = calibrate_to_flops(ddp, list(data.test), ctx, costs, route["gflops"] * 1e9, tolerance=0.001)
    out = {}
    out["mt_correct"], out["mt_loss"], a = per_image(ddp, data.test)
    out["mt_flops"] = routed_flops(costs, torch.as_tensor(a)).numpy()
    static = []
    for b in w.curve:
        path = os.path.join(u, "curve", f"b{b:.2f}", "prune", "checkpoint.pt") if b < 1.0 else \
            os.path.join(u, "prune", "checkpoint.pt")
        d2, data2, costs2 = load_unit(w, path, ctx)
        c, _, _ = per_image(d2, data2.test, "open")
        static.append({"budget": b, "static_acc": c.mean() * 100,
                       "static_gflops": route_flops(costs2, [1] * len(costs2["blocks"])) / 1e9})
    np.savez(os.path.join(u, "curve.npz"), **out)
    write_json(os.path.join(u, "curve.json"), _plain({"static": static, "matched_on_test": {
        **shift, "gflops_test": float(out["mt_flops"].mean() / 1e9), "fixed_gflops": route["gflops"]}}))


def valroutes_step(w, u, ctx):
    """Validation numbers of the two controllers of one unit (the controller choice, made on validation)."""
    out = {}
    for key, path in (("counterfactual", os.path.join(u, "rl", "checkpoint.pt")),
                      ("reinforce", os.path.join(u, "reinforce", "rl", "checkpoint.pt"))):
        ddp, data, costs = load_unit(w, path, ctx)
        c, _, a = per_image(ddp, data.eval)
        out[key] = {"val_acc": c.mean() * 100,
                    "val_gflops": routed_flops(costs, torch.as_tensor(a)).mean().item() / 1e9,
                    "val_distinct_routes": len(np.unique(a, axis=0)),
                    "calibration_shift_last": read_json(os.path.join(os.path.dirname(path), "metrics.json"))[
                        "ending"]["calibration"][-1]["shift"]}
    write_json(os.path.join(u, "valroutes.json"), _plain(out))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ------------------------------------------------------------------------------------------ the report

def load_units(units):
    got = []
    for u, split in units:
        if os.path.isfile(os.path.join(u, "eval.json")):
            arrays, summary = dict(np.load(os.path.join(u, "eval.npz"))), read_json(os.path.join(u, "eval.json"))
            if os.path.isfile(os.path.join(u, "curve.json")):  # the curve's static points, the FLOPs-match check
                arrays.update(np.load(os.path.join(u, "curve.npz")))
                summary["curve_extra"] = read_json(os.path.join(u, "curve.json"))
            got.append((u, split, arrays, summary))
    return got


def report(s, data, units, level=None):
    """Pooled statistics over every evaluated unit ([(folder, split)]) -> a JSON-ready dict; `level`: the
    difficulty level of every image (indexed by the units' image ids), if the data has levels."""
    got = load_units(units)
    if not got:
        raise UserError(f"no unit is evaluated yet ({', '.join(u for u, _ in units[:3])} ...)")
    level = np.zeros(max(int(a["ids"].max()) for _, _, a, _ in got) + 1, dtype=np.int64) if level is None else level
    ids = [a["ids"] for _, _, a, _ in got]
    r = {"data": data, "units": len(got), "n": int(sum(len(i) for i in ids)), "scale": _plain(s)}

    def compare(a_key, b_key, alternative):
        rep = paired.pooled_report([a[f"{a_key}_correct"] for _, _, a, _ in got],
                                   [a[f"{b_key}_correct"] for _, _, a, _ in got], image_ids=ids,
                                   alternative=alternative)
        rep["loss"] = asdict(paired.paired_loss_test(np.concatenate([a[f"{a_key}_loss"] for _, _, a, _ in got]),
                                                     np.concatenate([a[f"{b_key}_loss"] for _, _, a, _ in got]),
                                                     alternative="less"))
        return rep

    r["dynamic_vs_fixed"] = compare("dyn", "fix", "greater")
    checked = all("curve_extra" in e for _, _, _, e in got)
    if checked:  # the threshold set on each test fold's images to the fixed route's GFLOPs exactly
        r["dynamic_vs_fixed_matched_on_test"] = compare("mt", "fix", "greater")
        r["matched_on_test_max_rel_diff"] = float(max(abs(e["curve_extra"]["matched_on_test"]["gflops_test"] /
                                                          e["fixed_gflops"] - 1) for _, _, _, e in got))
    r["dynamic_vs_equal"] = compare("dyn", "equal", "greater")
    r["dynamic_vs_static"] = compare("dyn", "static", "two-sided")
    r["static_vs_unpruned"] = compare("static", "unpruned", "two-sided")
    r["dynamic_vs_unpruned"] = compare("dyn", "unpruned", "two-sided")
    g = lambda key: np.array([e[key] for _, _, _, e in got])  # noqa: E731
    dyn_g, fix_g = g("dyn_gflops"), g("fixed_gflops")
    r["gflops"] = {k: float(g(f"{k}_gflops").mean()) for k in ("dyn", "fixed", "equal", "static", "unpruned")}
    r["gflops_match"] = {"max_rel_diff_dynamic_fixed": float(np.max(np.abs(dyn_g / fix_g - 1))),
                         "max_rel_diff_equal_fixed": float(np.max(np.abs(g("equal_gflops") / fix_g - 1)))}
    r["acc"] = {k: float(np.concatenate([a[f"{k}_correct"] for _, _, a, _ in got]).mean() * 100)
                for k in ("dyn", "fix", "equal", "static", "unpruned")}
    # the static + dynamic network's saving over static only, and its accuracy against the unpruned one
    r["saving_vs_static"] = float(1 - r["gflops"]["dyn"] / r["gflops"]["static"])
    # controls
    parts = [(a["ctl_correct"], a["ctl_assign"], None) for _, _, a, _ in got]
    r["shuffle"] = asdict(paired.pooled_shuffle(parts))
    if len(np.unique(level)) > 1:
        parts = [(a["ctl_correct"], a["ctl_assign"], level[a["ids"]]) for _, _, a, _ in got]
        r["shuffle_within_levels"] = asdict(paired.pooled_shuffle(parts))
    oracles = {}
    for tol in (2, 5):
        rows = []
        for _, _, a, e in got:
            o = paired.two_route_oracle(a["orc_correct"], a["orc_val"], e["full_val_acc"] / 100, within=tol)[tol]
            if o is not None:
                rows.append((len(a["ids"]), o))
        if rows:
            w = np.array([n for n, _ in rows], dtype=float)
            oracles[tol] = {"units": len(rows),
                            **{k: float(np.average([getattr(o, k) for _, o in rows], weights=w))
                               for k in ("oracle_acc", "random_acc", "best_single_acc", "headroom")}}
    r["oracle"] = oracles
    # per seed: collapse, calibration, GFLOPs by difficulty
    per_seed = {}
    for seed in sorted({sp.seed for _, sp, _, _ in got}):
        mine = [(a, e) for _, sp, a, e in got if sp.seed == seed]
        entry = {"units": len(mine), "collapsed_units": sum(e["val_distinct_routes"] <= 1 for _, e in mine),
                 "val_distinct_routes": [e["val_distinct_routes"] for _, e in mine],
                 "max_abs_last_shift": max(abs(e["calibration_shift_last"]) for _, e in mine),
                 "max_abs_matching_shift": max(abs(e["dynamic_shift"]["shift"]) for _, e in mine)}
        if len(np.unique(level)) > 1:
            flops = np.concatenate([a["dyn_flops"] for a, _ in mine]) / 1e9
            lv = np.concatenate([level[a["ids"]] for a, _ in mine])
            correct = np.concatenate([a["dyn_correct"] for a, _ in mine])
            entry["by_level"] = [{"level": int(k), "images": int((lv == k).sum()),
                                  "gflops": float(flops[lv == k].mean()),
                                  "acc": float(correct[lv == k].mean() * 100)} for k in np.unique(lv)]
            entry["hard_minus_easy_gflops"] = entry["by_level"][-1]["gflops"] - entry["by_level"][0]["gflops"]
        per_seed[str(seed)] = entry
    r["per_seed"] = per_seed
    # curves: means over units at each budget
    budgets = [c["budget"] for c in got[0][3]["curve"]]
    r["curve"] = [{k: float(np.mean([e["curve"][i][k] for _, _, _, e in got]))
                   for k in ("budget", "dyn_acc", "dyn_gflops", "fixed_acc", "fixed_gflops")}
                  for i in range(len(budgets))]
    if checked:
        for i, c in enumerate(r["curve"]):
            c.update({k: float(np.mean([e["curve_extra"]["static"][i][k] for _, _, _, e in got]))
                      for k in ("static_acc", "static_gflops")})
    # the controller choice (validation, first seed)
    vr = [read_json(os.path.join(u, "valroutes.json")) for u, _ in units
          if os.path.isfile(os.path.join(u, "valroutes.json"))]
    if vr:
        r["controllers_on_val"] = {k: {"units": len(vr),
                                       "val_acc": float(np.mean([v[k]["val_acc"] for v in vr])),
                                       "val_gflops": float(np.mean([v[k]["val_gflops"] for v in vr])),
                                       "collapsed_units": int(sum(v[k]["val_distinct_routes"] <= 1 for v in vr)),
                                       "val_distinct_routes": [v[k]["val_distinct_routes"] for v in vr],
                                       "max_abs_last_shift": float(max(abs(v[k]["calibration_shift_last"])
                                                                       for v in vr))}
                                   for k in ("counterfactual", "reinforce")}
    return r


def markdown(r, command):
    a, f = r["acc"], r["dynamic_vs_fixed"]
    title = {"graded": "cross-fitted on digits of graded difficulty", "plain": "cross-fitted on plain digits",
             "cifar100": "CIFAR-100's test set"}.get(r["data"], r["data"])
    quick = (r.get("scale") or {}).get("name") == "quick"
    lines = [f"# What the switches add: {title}" + (" (quick scale)" if quick else ""), "",
             *(["The quick scale is a smoke run of the code path (tiny images, one epoch per stage): its numbers "
                "say nothing about the switches.", ""] if quick else []),
             f"{r['units']} unit(s) (folds x seeds), {r['n']} paired test predictions "
             f"({f['n_images']} distinct images). Reproduce: `{command}`.", "",
             "| network (test, pooled) | acc % | GFLOPs/image |", "|---|---|---|"]
    names = {"unpruned": "w/o pruning (stage 1, every block)", "static": "static only (stage 2, every block)",
             "dyn": "static + dynamic (stage 3, at the fixed route's GFLOPs)",
             "fix": "best fixed route, fine-tuned (stage-3 weights)", "equal": "static pruning at equal GFLOPs"}
    gk = {"fix": "fixed"}
    for k in ("unpruned", "static", "dyn", "fix", "equal"):
        lines.append(f"| {names[k]} | {a[k]:.2f} | {r['gflops'][gk.get(k, k)]:.5f} |")
    lines += ["", "| comparison | diff (points) | 95% CI (bootstrap, by image) | McNemar p | "
                  "right only with A / only with B | CE: Wilcoxon p (A lower) |",
              "|---|---|---|---|---|---|"]
    for key, label, side in (("dynamic_vs_fixed", "dynamic - best fixed route", "one-sided"),
                             ("dynamic_vs_equal", "dynamic - static at equal GFLOPs", "one-sided"),
                             ("dynamic_vs_static", "dynamic - static only", "two-sided"),
                             ("dynamic_vs_unpruned", "dynamic - w/o pruning", "two-sided")):
        c = r[key]
        lines.append(f"| {label} | {c['diff']:+.2f} | [{c['ci']['low']:+.2f}, {c['ci']['high']:+.2f}] | "
                     f"{c['mcnemar']['p']:.3g} ({side}) | {c['mcnemar']['only_a']} / {c['mcnemar']['only_b']} | "
                     f"{c['loss']['wilcoxon_p']:.3g} |")
    lines += ["", f"Power: {f['power']['text']}.", "",
              f"GFLOPs matched: dynamic vs fixed within {100 * r['gflops_match']['max_rel_diff_dynamic_fixed']:.2f}% "
              f"in every unit, static at equal GFLOPs within "
              f"{100 * r['gflops_match']['max_rel_diff_equal_fixed']:.2f}%. "
              f"Static + dynamic costs {100 * r['saving_vs_static']:.1f}% fewer GFLOPs than static only.", "",
              "Controls on the stage-3 weights (same routes, shuffled across test images):", ""]
    for key, label in (("shuffle", "overall"), ("shuffle_within_levels", "within difficulty levels")):
        if key in r:
            c = r[key]
            lines.append(f"- {label}: routed {100 * c['acc_assigned']:.2f}% vs shuffled {100 * c['acc_shuffled']:.2f}% "
                         f"(95% of shuffles in [{100 * c['low']:.2f}, {100 * c['high']:.2f}]), "
                         f"permutation p {c['p']:.3g}")
    if "dynamic_vs_fixed_matched_on_test" in r:
        c = r["dynamic_vs_fixed_matched_on_test"]
        lines.append(f"- FLOPs-match check: the dynamic threshold set on each test fold's own images "
                     f"(labels unused) to "
                     f"the fixed route's GFLOPs (within {100 * r['matched_on_test_max_rel_diff']:.2f}% in every unit): "
                     f"dynamic - fixed {c['diff']:+.2f} points, CI [{c['ci']['low']:+.2f}, {c['ci']['high']:+.2f}], "
                     f"McNemar p {c['mcnemar']['p']:.3g} (one-sided), "
                     f"{c['mcnemar']['only_a']} / {c['mcnemar']['only_b']}")
    for tol, o in r["oracle"].items():
        lines.append(f"- two-route oracle, routes within {tol} val points of the full network ({o['units']} units): "
                     f"{o['oracle_acc'] * 100:.2f}% vs the pair at random {o['random_acc'] * 100:.2f}% "
                     f"(headroom {o['headroom']:+.2f} points), best single route {o['best_single_acc'] * 100:.2f}%")
    lines += ["", "| seed | collapsed units | distinct val routes | max last calibration shift | hard - easy GFLOPs |",
              "|---|---|---|---|---|"]
    for seed, e in r["per_seed"].items():
        he = f"{e['hard_minus_easy_gflops'] * 1e3:+.3f} M" if "hard_minus_easy_gflops" in e else "-"
        lines.append(f"| {seed} | {e['collapsed_units']} of {e['units']} | {e['val_distinct_routes']} | "
                     f"{e['max_abs_last_shift']:.3f} | {he} |")
    if any("by_level" in e for e in r["per_seed"].values()):
        lines += ["", "GFLOPs and accuracy of the dynamic network by difficulty level (0 easiest), per seed:", ""]
        for seed, e in r["per_seed"].items():
            lines.append(f"- seed {seed}: " + ", ".join(f"L{b['level']} {b['gflops'] * 1e3:.3f} M / {b['acc']:.1f}%"
                                                         for b in e["by_level"]))
    st = "static_acc" in r["curve"][0]
    lines += ["", "Accuracy-GFLOPs (test, mean over units; threshold swept for the dynamic network, the best "
              "fixed route on validation at each budget, not fine-tuned" + (", static pruning pushed to each "
              "budget's GFLOPs (at 1.00: the stage-2 network)" if st else "") + "):", "",
              "| budget (of gated FLOPs) | dynamic acc | dynamic GFLOPs | fixed acc | fixed GFLOPs |"
              + (" static acc | static GFLOPs |" if st else ""), "|---|---|---|---|---|" + ("---|---|" if st else "")]
    for c in r["curve"]:
        lines.append(f"| {c['budget']:.2f} | {c['dyn_acc']:.2f} | {c['dyn_gflops']:.5f} | {c['fixed_acc']:.2f} | "
                     f"{c['fixed_gflops']:.5f} |"
                     + (f" {c['static_acc']:.2f} | {c['static_gflops']:.5f} |" if st else ""))
    if "controllers_on_val" in r:
        lines += ["", "Controller choice (validation split of the first seed's units, same stage-2 networks and "
                  "target):", "",
                  "| controller | val acc | val GFLOPs | collapsed units | distinct val routes | max last shift |",
                  "|---|---|---|---|---|---|"]
        for k, v in r["controllers_on_val"].items():
            lines.append(f"| {k} | {v['val_acc']:.2f} | {v['val_gflops']:.5f} | "
                         f"{v['collapsed_units']} of {v['units']} | "
                         f"{v['val_distinct_routes']} | {v['max_abs_last_shift']:.3f} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", default="all",
                   choices=("all", "budget", "route", "evaluate", "targets", "curve", "valroutes", "report"),
                   help="all (default): every unit, then the report; the others are one unit's steps (run by all)")
    p.add_argument("unit", nargs="?", help="a unit's folder (the steps route, evaluate, valroutes)")
    p.add_argument("--scale", default="digits", choices=sorted(SCALES))
    p.add_argument("--quick", action="store_true", help="--scale quick")
    p.add_argument("--data", default="graded", choices=("graded", "plain"))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--controller", default="counterfactual", choices=("counterfactual", "reinforce"))
    p.add_argument("--no_reinforce_check", action="store_true",
                   help="skip stage 3 with the REINFORCE controller on the first seed's units (the controller choice)")
    p.add_argument("--out", default=None, help="the work (default: bench/out/crossfit-<data>; with --quick, "
                   "bench/out/crossfit-quick-<data>, never the full run's)")
    p.add_argument("--results", default=None, help="where crossfit-<data>.{md,json} go (default: bench/results; "
                   "with --quick, <out>/results, never over the full run's results)")
    u = p.add_argument_group("one unit's steps on a result folder of your own (bench/run_cifar100.sh)")
    u.add_argument("--data_dir", default=None, help="default: <unit>/data")
    u.add_argument("--val_split", type=float, default=None, help="as the stages were run (default: the scale's)")
    u.add_argument("--seed", type=int, default=None, help="as the stages were run (default: the unit's)")
    u.add_argument("--bs", type=int, default=None)
    u.add_argument("--route_epochs", type=int, default=None, help="of the fixed route (default: the scale's)")
    u.add_argument("--route_lr", type=float, default=None)
    u.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    s = {**SCALES["quick" if args.quick else args.scale], "name": "quick" if args.quick else args.scale}
    if args.seeds:
        s["seeds"] = tuple(args.seeds)
    if args.step in ("budget", "route", "evaluate", "targets", "curve", "valroutes"):
        if not args.unit:
            p.error(f"{args.step} needs a unit folder")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        ctx = setup(args.device, 0)
        step = {"budget": budget_step, "route": route_step, "evaluate": evaluate_step, "targets": targets_step,
                "curve": curve_step, "valroutes": valroutes_step}[args.step]
        step(unit_where(s, args.unit, args), args.unit, ctx)
        return
    if args.step == "report" and args.unit:  # one result folder of your own: no folds, no difficulty levels
        r = {**report(s, "cifar100", [(args.unit, SimpleNamespace(seed=args.seed or 0))], level=None), "scale": None}
        write_json(os.path.join(args.unit, "crossfit.json"), r)
        with open(os.path.join(args.unit, "crossfit.md"), "w") as f:
            f.write(markdown(r, " ".join(["python bench/crossfit.py", *(argv if argv is not None else sys.argv[1:])])))
        print(markdown(r, "bench/run_cifar100.sh"), flush=True)
        return
    quick = s["name"] == "quick"
    out = args.out or os.path.join(ROOT, "bench", "out", f"crossfit-{'quick-' * quick}{args.data}")
    args.results = args.results or (os.path.join(out, "results") if quick else os.path.join(ROOT, "bench", "results"))
    units = write_units(s, args.data, out)
    if args.step == "all":
        tasks = plan(s, units, out, args.controller, not args.no_reinforce_check and args.data == "graded")
        try:
            run_all(tasks, args.jobs, args.threads, os.path.join(out, "logs"))
        except RuntimeError as e:
            print(f"[crossfit] {e}", flush=True)
    r = report(s, args.data, [(os.path.join(out, name), split) for name, split in units],
               level=np.load(os.path.join(out, "images.npz"))["level"])
    command = " ".join(["python bench/crossfit.py", *(argv if argv is not None else sys.argv[1:])])
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"crossfit-{args.data}")
    write_json(stem + ".json", r)
    with open(stem + ".md", "w") as f:
        f.write(markdown(r, command))
    print(markdown(r, command), flush=True)


if __name__ == "__main__":
    run_main(main)
