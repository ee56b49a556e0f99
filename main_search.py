"""The seed's protocol in one command: from a stage-1 result, the highest static compression whose fine-tuned
network stays within --budget points of the unpruned network's accuracy, then on that network the lowest
stage-3 GFLOPs target that still does, both chosen on the validation split of the stage-1 run (never on
test); then each chosen network is evaluated once on the test split.

    python main_search.py --result_dir results --prune_config config.json [--budget 1.0] [--storage URL]

Reads <result_dir>/sp/checkpoint.pt (stage 1, run with --val_split > 0) and writes <result_dir>/search/:
search.db (the Optuna studies), trials/ (every trial's stage folder), trials.json, table.md, table.json
and pareto.png. Run the same command again to continue an interrupted search, or on several machines with
one --storage (and a shared --result_dir) to split its trials (README: "The search").
"""
import json
import os
import time

import optuna

from search.bisection import Knob, label, no_trial_reason
from search.phase import Worker, open_storage, open_study, trial_records
from search.report import evaluate_on_test, missing_notes, plot, table_rows, write_table
from search.trials import DYNAMIC_KNOBS, Trials, stage3_argv, stage3_knob
from pruners.config import validate
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.lineage import check_chain
from utils.cli import Formatter, Parser, check_finite
from utils.dist import setup
from runtime.evaluate import evaluate
from runtime.loop import prepare
from utils.files import write_json
from utils.errors import UserError, run_main
from utils.flops import count_params, measure_costs, skipped_flops
from runtime.stage import check_result_dir
from utils.data import DataSettings, load_data

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


def baseline(study, stage1_path, data, eval_bs, ctx):
    """The unpruned network (every block, no switch) on the validation split; kept in the study so that
    every worker and every resumed run compares with the same number."""
    if "baseline" not in study.user_attrs:
        ckpt = load_checkpoint(stage1_path, ("sp",))
        loaded = load_data(DataSettings.of(data, bs=eval_bs, final_split="val"), ctx,
                           recorded=ckpt.get("pipeline"), source=f"--checkpoint {stage1_path}")
        model, ddp = prepare(model_from_checkpoint(ckpt, stage1_path), ctx)
        r = evaluate(ddp, loaded.eval, ctx, measure_costs(model, loaded.image_size), mode="open", desc="val")
        study.set_user_attr("baseline", {"val_acc": r["acc"], "val_gflops": r["gflops"],
                                         "params": count_params(model), "val_images": r["images"]})
    return study.user_attrs["baseline"]


def judged(metrics, threshold, keys=("compression", "alpha", "alpha_final", "target_gflops")):
    """What a trial keeps of its stage's metrics, and whether it is within the budget."""
    out = {k: metrics[k] for k in ("val_acc", "val_gflops", "params", "dir", "checkpoint")}
    out.update({k: metrics[k] for k in keys if metrics.get(k) is not None})
    return {**out, "feasible": metrics["val_acc"] >= threshold}


def line(kind, knob, threshold):
    def describe(x, r, seconds):
        head = f"[search] {kind} {knob} {x:.6g}:"
        if "error" in r:
            return f"{head} failed, counted as outside the budget ({r['error']}) ({seconds:.0f}s)"
        comp = f", {100 * r['compression']:.1f}% params removed" if r.get("compression") is not None else ""
        verdict = "within budget" if r["feasible"] else "outside budget"
        return (f"{head} val acc {r['val_acc']:.2f}% (needs >= {threshold:.2f}%), {r['val_gflops']:.4g} "
                f"GFLOPs{comp}: {verdict} ({seconds:.0f}s)")
    return describe


def finished(study, key="feasible"):
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get(key)]


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    check_args(args)
    knob_name = args.knob or stage3_knob()
    rl_argv = stage3_argv(args, knob_name)  # stage 3's flags, checked by stage 3's checks before any work
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
    settings = {"budget": args.budget, "val_split": data["val_split"], "seed": data["seed"],
                "resize": data["resize"], "prune_config": prune_config,
                "compressions": [args.min_compression, args.max_compression]}
    knob_c = Knob("compression", args.min_compression, args.max_compression, "high", 0.01)  # met within 1 point
    static_study = open_study(storage, f"{args.study_name}.static", knob_c, settings)
    base = baseline(static_study, stage1_path, data, eval_bs, ctx)
    threshold = base["val_acc"] - args.budget
    print(f"[search] unpruned network: val acc {base['val_acc']:.2f}% on {base['val_images']} validation images; "
          f"trials must reach {threshold:.2f}%", flush=True)
    trials = Trials(search_dir, os.path.abspath(stage1_path), data, prune_config, rl_argv, args.device)
    worker = Worker(trials.root)

    worker.run_phase(static_study, knob_c, args.static_trials,
                     lambda c, folder: judged(trials.static(c, folder), threshold),
                     line("static", "compression", threshold))
    statics = sorted(finished(static_study), key=lambda t: -t.user_attrs["compression"])
    dynamic_studies, idle = [], []  # idle: why the dynamic phase ran no trial on a static network
    for t in statics[:args.dynamic_networks] if args.dynamic_trials else []:
        c = t.params["compression"]
        knob = dynamic_knob(knob_name, t.user_attrs, args.max_alpha, data["resize"], ctx)
        why = no_trial_reason(knob)
        if why:
            ends = " (GFLOPs from the network with every gated block skipped to the static network itself)" \
                if knob.name == "target_gflops" else ""
            idle.append(f"on the network at compression {c:.6g}{ends}, {why}")
            print(f"[search] dynamic (compression {c:.6g}): no trial{ends}: {why}", flush=True)
            continue
        study = open_study(storage, f"{args.study_name}.dynamic.c{label(c)}", knob,
                           {**settings, "rl": rl_argv, "knob": [knob.name, knob.low, knob.high]})
        worker.run_phase(study, knob, args.dynamic_trials,
                         lambda x, folder, src=t.user_attrs["checkpoint"]: judged(
                             trials.dynamic(src, knob.name, x, folder), threshold),
                         line(f"dynamic (compression {c:.6g})", knob.name, threshold))
        dynamic_studies.append((c, study))
    notes = missing_notes(static_study, dynamic_studies, bool(statics), args.dynamic_trials, idle)
    report(args, search_dir, stage1_path, data, eval_bs, ctx, base, threshold, static_study, statics,
           dynamic_studies, notes, t0)


def dynamic_knob(name, static, max_alpha, image_size, ctx):
    """Stage 3's knob on one static network: a GFLOPs target between the network with every gated block
    skipped and the static network itself (met within 3%), or alpha in [0, max_alpha]."""
    if name == "alpha":
        return Knob("alpha", 0.0, max_alpha, "high", max_alpha / 64)
    model = model_from_checkpoint(load_checkpoint(static["checkpoint"], ("prune",)), static["checkpoint"])
    costs = measure_costs(model.to(ctx.device), image_size)
    floor = skipped_flops(costs) / 1e9
    return Knob("target_gflops", floor, static["val_gflops"], "low", 0.03 * static["val_gflops"])


def report(args, search_dir, stage1_path, data, eval_bs, ctx, base, threshold, static_study, statics,
           dynamic_studies, notes, t0):
    """Choose, evaluate the chosen networks once on test, write trials.json, pareto.png and the table."""
    dynamics = [(c, t) for c, s in dynamic_studies for t in finished(s)]
    chosen = {"sp": {"checkpoint": os.path.abspath(stage1_path), "mode": "open"}}
    info = {"sp": {"settings": {}, "val_acc": base["val_acc"], "val_gflops": base["val_gflops"]}}
    if statics:
        t = statics[0]
        chosen["prune"] = {"checkpoint": t.user_attrs["checkpoint"], "mode": "open"}  # row 2: every block
        info["prune"] = {"settings": {"compression target": t.params["compression"]},
                         "val_acc": t.user_attrs["val_acc"], "val_gflops": t.user_attrs["val_gflops"],
                         "trial_dir": t.user_attrs["dir"]}
    if dynamics:
        c, t = min(dynamics, key=lambda ct: (ct[1].user_attrs["val_gflops"], -ct[1].user_attrs["val_acc"]))
        (knob, x), = t.params.items()
        chosen["rl"] = {"checkpoint": t.user_attrs["checkpoint"], "mode": "hard"}
        info["rl"] = {"settings": {"compression target": c, knob: x, **({"alpha_final": t.user_attrs[
            "alpha_final"]} if "alpha_final" in t.user_attrs else {})}, "val_acc": t.user_attrs["val_acc"],
            "val_gflops": t.user_attrs["val_gflops"], "trial_dir": t.user_attrs["dir"]}
    records = trial_records(static_study, "static") + [r for _, s in dynamic_studies
                                                         for r in trial_records(s, "dynamic")]
    write_json(os.path.join(search_dir, "trials.json"), {"baseline": base, "threshold": threshold,
                                                         "trials": records})
    points = [{"kind": "static" if r["phase"] == "static" else "static+dynamic", **r} for r in records
              if r["state"] == "COMPLETE"]
    plot(points, base, threshold, [info[k] for k in ("prune", "rl") if k in info],
         os.path.join(search_dir, "pareto.png"))
    tested = evaluate_on_test(chosen, data, eval_bs, ctx, os.path.join(search_dir, "final"))
    if tested is None:
        return
    rows = table_rows(tested, info, base["params"], notes)
    text = write_table(search_dir, rows, args.budget, base["val_acc"], {
        "this_call_seconds": time.time() - t0,
        "trial_seconds_total": sum(r.get("seconds", 0) for r in records),
        "trials": len(points)})
    print(f"\n{text}-> {search_dir}/table.md, table.json, trials.json, pareto.png "
          f"({(time.time() - t0) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    run_main(main)
