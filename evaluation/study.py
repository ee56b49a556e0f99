"""The real-image study on CPU: scikit-learn's digits through the stage scripts, three seeds. It answers:
(1) is row 1 (stage 1: a dense start, then main_sp.py's joint training) as good as plain dense training of
the same net for the same epochs; (2) do the switches move in stage 3 at the original flags (alpha 0.1, gamma 1,
rl_weight 0.1, lr 0.001), and which way; (3) static + dynamic (setting chosen by main_search.py on the
validation split) against static only at the same compression; (4) at equal GFLOPs, per-image routing
against the best fixed route (evaluation/routes.py) and against static pruning alone pushed to that cost.

    nice -n 10 python -m evaluation.study                 # the study of evaluation/results/ (about an hour, 2 cores)
    python -m evaluation.study --quick --out DIR --results DIR   # the same code path in seconds (the smoke test)

Every number comes from the scripts run as subprocesses exactly as a user runs them (main_sp.py,
main_prune.py --config_path <generated json>, main_rl_prune.py, main_search.py, evaluation/fixed_route.py) and
from the JSON files they write. Layout under --out (default evaluation/out/study, git-ignored):

    data/                         the dataset in the PNG class-folder layout
    seed<s>/sp/                   stage 1 (dense start, then --train_mode joint): row 1
    seed<s>/dense/sp/             the same net trained plainly dense (--train_mode open), same epochs
    seed<s>/search/               main_search.py (first seed): the static + dynamic setting, on validation
    seed<s>/{prune,rl}/           the other seeds: stage 2 at the same compression, stage 3 at the chosen setting
    seed<s>/seedflags/rl/         stage 3 at the original flags from the static network (first seed)
    seed<s>/equal/prune/          stage 2 pushed to the GFLOPs of the seed's static + dynamic network
    seed<s>/route/route.json      the best fixed route at those GFLOPs (evaluation/fixed_route.py)
    logs/<task>.log               every subprocess's output

Results (--results, default evaluation/results/): study.json (everything, means and sample std over seeds),
study.md (the tables, described in docs/study.md), study_points.json and study.png (the picture). None are
committed: they are written by running the study.

Jobs run --jobs at a time (default 2), each with --threads torch threads (default 1): on a 2-core machine
two single-threaded processes beat one process with two threads. A task whose outputs exist from the same
command is not run again (delete --out to start afresh); a crash costs only the task that was running.
"""
import argparse
import json
import os
import time

from evaluation.digits import write_digits
from evaluation.runner import Task, run_all, stamp_path
from evaluation.study_report import markdown, optional, points, summarise
from utils.cli import Parser
from utils.errors import UserError, run_main
from utils.files import read_json
from utils.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The study's scale: ResNet-20 at width 1 on the 1,294 training images of digits left after the validation
# split (10%, 144 images); an epoch takes 20-45 s on one core of a busy machine. Stage 1 starts dense, then
# trains in the mode named here (named, not left to main_sp.py's default, so that a change of that default
# never reuses stage-1 runs made under another mode). Stage 3's knob in the search is the GFLOPs target (dual
# ascent on alpha from rl_alpha, the threshold calibrated at the end, then route_epochs on the greedy routes),
# rl_weight 0.01 per image (the policy loss is summed over the 64 images of a batch). The other seeds get a
# target at the same place between their own static network with every gated block skipped and with all run
# (setting_for).
SCALES = {
    "digits": dict(
        data="digits", resize=32, depth=20, width=1, bs=64, seeds=(0, 1, 2), val_split=0.1,
        sp=dict(epochs=15, dense_epochs=10, lr=0.1, train_mode="joint"),
        prune=dict(compression=0.6, epochs=5, lr=0.02, fisher_batches=16),
        rl=dict(epochs=12, lr=0.05, gamma=1.0, rl_weight=0.01, alpha=3.5, route_epochs=6, route_lr=0.02),
        seed_flags=dict(alpha=0.1, gamma=1.0, rl_weight=0.1, lr=0.001),
        search=dict(budget=1.0, knob="target_gflops", dynamic_trials=4, max_alpha=4.0)),
    "quick": dict(
        data="synthetic", resize=16, depth=8, width=1, bs=32, seeds=(0, 1), val_split=0.25,
        sp=dict(epochs=2, dense_epochs=1, lr=0.05, train_mode="joint"),
        prune=dict(compression=0.5, epochs=1, lr=0.01, fisher_batches=2),
        rl=dict(epochs=1, lr=0.01, gamma=1.0, rl_weight=0.01, alpha=1.0, route_epochs=1, route_lr=0.01),
        seed_flags=dict(alpha=0.1, gamma=1.0, rl_weight=0.1, lr=0.001),
        search=dict(budget=100.0, knob="target_gflops", dynamic_trials=2, max_alpha=4.0)),  # any network passes
}
# The same with a spread of difficulty, where which image skips a block should matter: half the images
# (train and test) with contrast halved and strong noise (evaluation/digits.write_digits' hard_fraction).
SCALES["digits-mixed"] = {**SCALES["digits"], "data": "digits-mixed"}


# ------------------------------------------------------------------------------------ the commands

def common_flags(s, data_dir, run_dir, seed):
    return ["--bs", str(s["bs"]), "--num_workers", "0", "--img_type", "png", "--seed", str(seed), "--device",
            "cpu", "--data_dir", data_dir, "--result_dir", run_dir, "--val_split", str(s["val_split"])]


def sp_command(s, data_dir, run_dir, seed, dense=False):
    """Stage 1: a dense start then the scale's train_mode (row 1), or plain dense training (the reference)."""
    mode = ["--train_mode", "open"] if dense else ["--train_mode", s["sp"]["train_mode"], "--dense_epochs",
                                                   str(s["sp"]["dense_epochs"])]
    return ["main_sp.py", "--network", "resnet", "--depth", str(s["depth"]), "--width", str(s["width"]),
            "--epochs", str(s["sp"]["epochs"]), "--lr", str(s["sp"]["lr"]), "--resize", str(s["resize"]),
            *mode, *common_flags(s, data_dir, run_dir, seed)]


def equal_epochs(s):
    """Fine-tuning epochs of static pruning pushed to equal GFLOPs: as many as the static + dynamic network
    trains after pruning (stage 2's, then stage 3's and its route epochs), so that neither side of that
    comparison has more training."""
    return s["prune"]["epochs"] + s["rl"]["epochs"] + s["rl"].get("route_epochs", 0)


def prune_config(s, data_dir, run_dir, seed, checkpoint=None, epochs=None, **target):
    """Stage 2's config: the scale's compression with EigenDamage's plain ranking, or (static pruning
    pushed to a GFLOPs target, the non-adaptive alternative to the switches) the target with the ranking
    that counts FLOPs (score_per_flop), the strongest at equal GFLOPs on digits (bench/bench_criteria.py)."""
    p = s["prune"]
    return {"result_dir": run_dir, "data_dir": data_dir, "checkpoint": checkpoint, "num_workers": 0,
            "resize": s["resize"], "prune_mode": "one_pass", "epochs": p["epochs"] if epochs is None else epochs,
            "lr": p["lr"], "bs": s["bs"], "fisher_batches": p["fisher_batches"], "seed": seed, "device": "cpu",
            "val_split": s["val_split"], "round_to": 1,  # free ranks, as when the study's numbers were made
            **({**target, "criterion": "score_per_flop"} if target else
               {"compression": p["compression"], "criterion": "score"})}


def rl_command(s, data_dir, run_dir, seed, checkpoint, setting, flags=None, final_split="test"):
    """Stage 3 at `setting`: {"alpha": a} or {"target_gflops": g} (then alpha starts at the scale's)."""
    f = flags or s["rl"]
    knob = ["--alpha", repr(setting["alpha"])] if "alpha" in setting else \
        ["--target_gflops", repr(setting["target_gflops"]), "--alpha", repr(f["alpha"])]
    return ["main_rl_prune.py", "--checkpoint", checkpoint, "--epochs", str(s["rl"]["epochs"]),
            "--lr", repr(f["lr"]), *knob, "--gamma", repr(f["gamma"]),
            "--rl_weight", repr(f["rl_weight"]),
            *(["--route_epochs", str(f["route_epochs"])] if f.get("route_epochs") else []),
            *(["--route_lr", repr(f["route_lr"])] if f.get("route_epochs") and f.get("route_lr") else []),
            "--final_split", final_split,
            *common_flags(s, data_dir, run_dir, seed)]


def search_command(s, run_dir, config_path):
    """main_search.py on the stage-1 run: stage 2 at the study's compression (--min/--max_compression pin it),
    then the stage-3 knob bisected for the fewest GFLOPs within the budget, on the validation split."""
    c, q, rl = s["prune"]["compression"], s["search"], s["rl"]
    return ["main_search.py", "--result_dir", run_dir, "--prune_config", config_path, "--device", "cpu",
            "--num_workers", "0", "--budget", str(q["budget"]), "--min_compression", str(c),
            "--max_compression", str(c), "--static_trials", "1", "--dynamic_trials", str(q["dynamic_trials"]),
            "--knob", q["knob"], "--max_alpha", str(q["max_alpha"]), "--rl_epochs", str(rl["epochs"]),
            "--rl_lr", repr(rl["lr"]), "--rl_bs", str(s["bs"]), "--rl_weight", repr(rl["rl_weight"]),
            "--gamma", repr(rl["gamma"]), "--rl_alpha", repr(rl["alpha"]), "--rl_route_epochs",
            str(rl["route_epochs"]), *(["--rl_route_lr", repr(rl["route_lr"])] if rl.get("route_lr") else [])]


# ------------------------------------------------------------------------------------- the networks

def searched(s, out):
    """The first seed's search: its table rows (test numbers of the chosen networks) and chosen settings."""
    run = os.path.join(out, f"seed{s['seeds'][0]}")
    return read_json(os.path.join(run, "search", "table.json"))["rows"]


def gflops_range(s, checkpoint):
    """(GFLOPs per image with every gated block skipped, with every block run) of a stage-2 checkpoint: the
    interval a stage-3 GFLOPs target must lie in."""
    from runtime.predict import checkpoint_costs
    from utils.flops import gflops_bounds
    return gflops_bounds(checkpoint_costs(checkpoint, flag="--checkpoint"))


def chosen(s, out):
    """The first seed's static + dynamic setting: {"alpha": a} or {"target_gflops": g, "fraction": where g
    lies between that seed's static network with every gated block skipped (0) and with all run (1)}."""
    rows = searched(s, out)
    if not rows[2].get("present"):
        raise RuntimeError("main_search.py found no static + dynamic setting within the budget on the "
                           "validation split of the first seed; see its trials.json")
    knob = s["search"]["knob"]
    x = rows[2]["settings"][knob]
    if knob == "alpha":
        return {"alpha": x}
    low, high = gflops_range(s, os.path.join(rows[1]["trial_dir"], "prune", "checkpoint.pt"))
    return {"target_gflops": x, "fraction": (x - low) / (high - low)}


def setting_for(s, out, seed):
    """The first seed's setting as stage 3's flags for `seed`: a GFLOPs target at the same place between the
    seed's own static network with every gated block skipped and with all run (so always within its reach;
    the static networks of different seeds differ in size), alpha as it is."""
    c = chosen(s, out)
    if "alpha" in c:
        return c
    low, high = gflops_range(s, os.path.join(out, f"seed{seed}", "prune", "checkpoint.pt"))
    return {"target_gflops": round(low + c["fraction"] * (high - low), 6)}


def networks(s, out, seed):
    """{"static", "dynamic"}: checkpoint, test_acc, gflops_per_image, params of the seed's static network
    (compression fixed) and its static + dynamic network (the search's setting)."""
    run = os.path.join(out, f"seed{seed}")
    if seed == s["seeds"][0]:
        finals = {k: read_json(os.path.join(run, "search", "final", f"{k}.json")) for k in ("prune", "rl")}
    else:
        finals = {k: {**read_json(os.path.join(run, k, "metrics.json")),
                      "checkpoint": os.path.join(run, k, "checkpoint.pt")} for k in ("prune", "rl")}
    keys = ("checkpoint", "test_acc", "gflops_per_image", "params")
    return {name: {k: finals[stage][k] for k in keys} for name, stage in (("static", "prune"), ("dynamic", "rl"))}


# ------------------------------------------------------------------------------------- the tasks

def plan(s, out):
    """Every task of the study with its dependencies, in the order they are started once ready: the chain
    to the headline numbers first (the first seed's stage 1 and search), the dense reference runs and the
    equal-GFLOPs stage-2 runs of the other seeds last (a study stopped early reports what it has)."""
    data = os.path.join(out, "data")
    first = s["seeds"][0]
    run0 = os.path.join(out, f"seed{first}")
    cfg0 = os.path.join(run0, "search_prune_config.json")
    runs = {seed: os.path.join(out, f"seed{seed}") for seed in s["seeds"]}
    tasks = [Task(f"sp/seed{first}", sp_command(s, data, run0, first), os.path.join(run0, "sp", "metrics.json")),
             Task(f"search/seed{first}", search_command(s, run0, cfg0), os.path.join(run0, "search", "table.json"),
                  [f"sp/seed{first}"], prune_config(s, data, run0, first), cfg0)]
    others = s["seeds"][1:]
    tasks += [Task(f"sp/seed{seed}", sp_command(s, data, runs[seed], seed),
                   os.path.join(runs[seed], "sp", "metrics.json")) for seed in others]
    for seed in others:  # the first seed's setting applied to the other seeds
        cfg = os.path.join(runs[seed], "prune_config.json")
        tasks.append(Task(f"prune/seed{seed}", ["main_prune.py", "--config_path", cfg],
                          os.path.join(runs[seed], "prune", "metrics.json"), [f"sp/seed{seed}"],
                          prune_config(s, data, runs[seed], seed), cfg))
    for seed in others:
        tasks.append(Task(f"rl/seed{seed}", lambda run=runs[seed], seed=seed: rl_command(
            s, data, run, seed, os.path.join(run, "prune", "checkpoint.pt"), setting_for(s, out, seed)),
            os.path.join(runs[seed], "rl", "metrics.json"), [f"prune/seed{seed}", f"search/seed{first}"]))
    tasks.append(Task(f"seedflags/seed{first}", lambda: rl_command(
        s, data, os.path.join(run0, "seedflags"), first, os.path.join(searched(s, out)[1]["trial_dir"], "prune",
                                                                     "checkpoint.pt"),
        {"alpha": s["seed_flags"]["alpha"]}, s["seed_flags"], final_split="val"),
        os.path.join(run0, "seedflags", "rl", "metrics.json"), [f"search/seed{first}"]))

    def budget(seed):
        return round(networks(s, out, seed)["dynamic"]["gflops_per_image"], 6)

    def dynamic_task(seed):
        return f"search/seed{first}" if seed == first else f"rl/seed{seed}"

    def equal(seed):  # static pruning pushed to the GFLOPs of the seed's static + dynamic network
        run, cfg = runs[seed], os.path.join(runs[seed], "equal_config.json")
        return Task(f"equal/seed{seed}", ["main_prune.py", "--config_path", cfg],
                    os.path.join(run, "equal", "prune", "metrics.json"), [dynamic_task(seed), f"sp/seed{seed}"],
                    lambda: prune_config(s, data, os.path.join(run, "equal"), seed,
                                         os.path.join(run, "sp", "checkpoint.pt"), equal_epochs(s),
                                         gflops=budget(seed)), cfg)

    def route(seed):  # the best fixed route at those GFLOPs, on the stage-3 and on the stage-2 weights
        nets = lambda: networks(s, out, seed)  # noqa: E731
        return Task(f"route/seed{seed}", lambda: [
            "-m", "evaluation.fixed_route", "--checkpoint", nets()["dynamic"]["checkpoint"], "--checkpoint",
            nets()["static"]["checkpoint"], "--bs", str(s["bs"]), "--budget_gflops", repr(budget(seed)),
            "--data_dir", data, "--val_split", str(s["val_split"]), "--seed", str(seed), "--out",
            os.path.join(runs[seed], "route", "route.json")], os.path.join(runs[seed], "route", "route.json"),
            [dynamic_task(seed)])

    def difficulty(seed):  # --mixed: the routes of hard and easy test images (stage 2's and stage 3's network)
        nets = lambda: networks(s, out, seed)  # noqa: E731
        return Task(f"difficulty/seed{seed}", lambda: [
            "-m", "evaluation.routes_by_difficulty", nets()["static"]["checkpoint"], nets()["dynamic"]["checkpoint"],
            "--data_dir", data, "--out", os.path.join(runs[seed], "difficulty.json")],
            os.path.join(runs[seed], "difficulty.json"), [dynamic_task(seed)])

    tasks += [equal(first)] + [route(seed) for seed in s["seeds"]]
    if s["data"] == "digits-mixed":
        tasks += [difficulty(seed) for seed in s["seeds"]]
    tasks += [Task(f"dense/seed{seed}", sp_command(s, data, os.path.join(runs[seed], "dense"), seed, dense=True),
                   os.path.join(runs[seed], "dense", "sp", "metrics.json")) for seed in s["seeds"]]
    return tasks + [equal(seed) for seed in others]


# ----------------------------------------------------------------------------------- the results

def seed_results(s, out, seed):
    """Every number of one seed, each from the JSON a script wrote."""
    run = os.path.join(out, f"seed{seed}")
    sp = read_json(os.path.join(run, "sp", "metrics.json"))
    r = {"seed": seed, "row1": {"test_acc": sp["test_acc"], "gflops_per_image": sp["gflops_per_image"],
                                "routed_acc": sp.get("routed_acc"), "params": sp["params"]}}
    dense = optional(read_json, os.path.join(run, "dense", "sp", "metrics.json"))
    r["dense"] = dense and {"test_acc": dense["test_acc"]}
    nets = optional(networks, s, out, seed)
    if nets:
        for name, net in nets.items():
            r[name] = {**net, "compression": 1 - net["params"] / sp["params"]}
        r["gflops_reduction"] = 1 - nets["dynamic"]["gflops_per_image"] / nets["static"]["gflops_per_image"]
        r["dynamic_drop"] = sp["test_acc"] - nets["dynamic"]["test_acc"]
        r["static_drop"] = sp["test_acc"] - nets["static"]["test_acc"]
    equal = optional(read_json, os.path.join(run, "equal", "prune", "metrics.json"))
    r["static_equal"] = equal and {k: equal[k] for k in ("test_acc", "gflops_per_image", "params", "compression")}
    route = optional(read_json, os.path.join(run, "route", "route.json"))
    if route and nets:
        by = route["networks"]
        r["route_stage3_weights"] = {k: by[nets["dynamic"]["checkpoint"]].get(k) for k in ("at_or_under", "over")}
        r["route_stage2_weights"] = {k: by[nets["static"]["checkpoint"]].get(k) for k in ("at_or_under", "over")}
    difficulty = optional(read_json, os.path.join(run, "difficulty.json"))
    if difficulty and nets:
        r["by_difficulty"] = {name: difficulty[nets[name]["checkpoint"]] for name in ("static", "dynamic")}
    return r


def seed_flags(s, out):
    """Stage 3 at the original flags from the first seed's static network: greedy execution rate per switch
    before (the static network) and after, both on the validation split."""
    before = read_json(os.path.join(searched(s, out)[1]["trial_dir"], "prune", "metrics.json"))
    after = read_json(os.path.join(out, f"seed{s['seeds'][0]}", "seedflags", "rl", "metrics.json"))
    return {"flags": s["seed_flags"], "epochs": s["rl"]["epochs"],
            "before": {k: before[k] for k in ("exec_rate", "val_acc", "gflops_per_image")},
            "after": {k: after[k] for k in ("exec_rate", "val_acc", "gflops_per_image")}}


# -------------------------------------------------------------------------------------------- main

def record_timing(s, tasks, wall, out, jobs):
    """This call's wall time, and the study's from scratch: measured by the last call that reused no task
    (kept in <out>/full_run.json), valid while the scale is the same."""
    path = os.path.join(out, "full_run.json")
    if tasks and not any(t.reused for t in tasks) and all(t.seconds is not None for t in tasks):
        with open(path, "w") as f:
            json.dump({"wall_seconds": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "load_average_1_5_15_min": os.getloadavg(), "scale": s}, f, indent=2)
    full = read_json(path) if os.path.isfile(path) else None
    return {"this_call_seconds": wall, "task_seconds_total": sum(t.seconds or 0 for t in tasks), "jobs": jobs,
            "search_seconds": {t.name: t.seconds for t in tasks if t.name.startswith("search/")},
            "from_scratch": full if full and full["scale"] == json.loads(json.dumps(s)) else None}


def shown(path):
    """A path as the commands name it: relative to the repository root when inside it."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def prepare_data(s, out):
    """The scale's dataset under <out>/data, written once; its kind is stamped there, so that runs of another
    scale are never reused under the same --out."""
    path, stamp = os.path.join(out, "data"), os.path.join(out, "data_kind.txt")
    kind = open(stamp).read().strip() if os.path.isfile(stamp) else None
    if os.path.isdir(path) and kind not in (None, s["data"]):  # None: a study from before the stamp
        raise UserError(f"--out {out} holds a study of {kind!r} data, not {s['data']!r}: give another --out")
    if not os.path.isdir(path):
        if s["data"] in ("digits", "digits-mixed"):
            write_digits(path, size=32, hard_fraction=0.5 if s["data"] == "digits-mixed" else 0.0)
        else:
            write_synthetic(path, num_classes=4, train_per_class=16, test_per_class=8, size=s["resize"])
    with open(stamp, "w") as f:
        f.write(s["data"])
    return path


def report_only(tasks):
    """The tasks as done by earlier calls (their stamps); RuntimeError names those not done."""
    missing = []
    for t in tasks:
        if optional(t.resolve) is None and callable(t.argv) or not os.path.isfile(stamp_path(t)):
            missing.append(t.name)
            continue
        t.seconds, t.reused = read_json(stamp_path(t))["seconds"], True
    if missing:
        raise RuntimeError("not done (yet): " + ", ".join(missing))


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny synthetic scale: the smoke test's")
    p.add_argument("--mixed", action="store_true", help="digits with a spread of difficulty: half the images "
                   "(train and test) with contrast halved and strong noise")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    p.add_argument("--out", default=None, help="runs and logs (default: evaluation/out/study; --mixed: "
                   "evaluation/out/study-mixed; --quick: evaluation/out/study-quick)")
    p.add_argument("--results", default=None, help="summary files (default: evaluation/results; --mixed: "
                   "evaluation/results/mixed; --quick: <out>/results)")
    p.add_argument("--jobs", type=int, default=2, help="tasks run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--report", action="store_true", help="run nothing: write the results from the tasks done "
                   "(while a study runs, or after one was stopped)")
    args = p.parse_args(argv)
    if args.quick and args.mixed:
        p.error("--quick and --mixed are two scales: give one")
    for name in ("jobs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be >= 1")
    s = dict(SCALES["quick" if args.quick else "digits-mixed" if args.mixed else "digits"])
    args.out = args.out or os.path.join(ROOT, "evaluation", "out",
                                        "study-quick" if args.quick else "study-mixed" if args.mixed else "study")
    # a quick run never writes over the study's results
    args.results = args.results or (os.path.join(args.out, "results") if args.quick else
                                    os.path.join(ROOT, "evaluation", "results", *(["mixed"] if args.mixed else [])))
    if args.seeds:
        s["seeds"] = tuple(args.seeds)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    prepare_data(s, out)
    tasks = plan(s, out)
    failure = None
    try:
        if args.report:
            report_only(tasks)
        else:
            run_all(tasks, args.jobs, args.threads, os.path.join(out, "logs"))
    except RuntimeError as e:  # report what exists, then fail
        failure = str(e)
        print(f"[study] {failure}", flush=True)
    wall = time.time() - t0
    timing = record_timing(s, tasks, wall, out, args.jobs)

    per_seed = [r for r in (optional(seed_results, s, out, seed) for seed in s["seeds"]) if r]
    if not per_seed:  # nothing done yet: leave the results of an earlier study as they are
        print(f"[study] no seed has results yet: nothing written to {args.results}", flush=True)
        raise SystemExit(1)
    mean = summarise(per_seed)
    flags = optional(seed_flags, s, out)
    setting = optional(chosen, s, out)
    command = "python -m evaluation.study" + (" --quick" if args.quick else "") + (" --mixed" if args.mixed else "") + \
        (f" --seeds {' '.join(map(str, s['seeds']))}" if args.seeds else "")
    os.makedirs(args.results, exist_ok=True)
    pts = points(per_seed)
    summary = {"command": command, "scale": s, "wall_seconds": wall, "timing": timing, "failure": failure,
               "task_seconds": {t.name: t.seconds for t in tasks}, "tasks_reused": [t.name for t in tasks if t.reused],
               "search_settings": {"chosen": setting, "search": optional(searched, s, out)},
               "per_seed": per_seed, "mean": mean, "seed_flags": flags,
               "commands": {t.name: ["python", *map(shown, t.argv)] for t in tasks if not callable(t.argv)},
               "stage2_configs": {t.name: t.config for t in tasks if t.config is not None and not callable(t.config)}}
    with open(os.path.join(args.results, "study.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.results, "study_points.json"), "w") as f:
        json.dump({"x": "gflops_per_image", "y": "test_acc", "points": pts}, f, indent=2)
    try:
        from evaluation.plot import plot_points
        plot_points(pts, os.path.join(args.results, "study.png"))
    except ImportError:
        print("[study] matplotlib missing: no study.png (pip install -r requirements.txt)", flush=True)
    with open(os.path.join(args.results, "study.md"), "w") as f:
        f.write(markdown(s, per_seed, mean, flags, setting, timing, command, equal_epochs(s)))
    print(open(os.path.join(args.results, "study.md")).read(), end="")
    print(f"[study] {wall / 60:.1f} min -> {args.results}/study.{{json,md,png}}, study_points.json", flush=True)
    if failure:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    run_main(main)
