"""The original protocol (docs/search.md): the static phase, the dynamic phase on the chosen static networks,
both chosen on the validation split, then the report (search/report.py)."""
import dataclasses
import os
import time

import optuna

from runtime import predict
from runtime.evaluate import evaluate
from search.bisection import Knob, label, no_trial_reason
from search.phase import Worker, open_study, run_alone, trial_records
from search.trials import DYNAMIC_KNOBS, record_of
from utils.cli import NULL, CommonSettings, Setting, in_range, like
from search.report import evaluate_on_test, missing_notes, plot, table_rows, write_table
from utils.data import DataSettings
from utils.files import write_json
from utils.flops import count_params, skipped_flops, to_gflops


TITLES = {"": None, "data": "data (default: the stage-1 run's; its --val_split and --seed give the split)",
          "search": "search", "stages": "stages"}


@dataclasses.dataclass
class SearchSettings:
    """main_search.py's settings (its flags); stage 3's are checked by search.trials.stage3_settings."""
    result_dir: str = Setting((str,), "reads <result_dir>/sp/, writes <result_dir>/search/", group="")("results")
    checkpoint: str = Setting((str, NULL), "the stage-1 checkpoint (default: <result_dir>/sp/checkpoint.pt)",
                              group="", flag={"metavar": "PATH"})(None)
    device: str = Setting((str, NULL), "cpu, cuda or cuda:N; none: cuda when available", group="")(None)
    data_dir: str = like(CommonSettings, "data_dir", None)
    img_type: str = like(CommonSettings, "img_type", None)
    resize: int = like(CommonSettings, "resize", None)
    num_workers: int = like(CommonSettings, "num_workers", None)
    budget: float = Setting((float,), "accuracy points (validation split) a chosen network may lose against the "
                            "unpruned one", in_range(0), group="search")(1.0)
    storage: str = Setting((str, NULL), "Optuna RDB URL shared by every worker (default: "
                           "sqlite:///<result_dir>/search/search.db); e.g. postgresql://user@host/db",
                           group="search")(None)
    study_name: str = Setting((str,), "prefix of the studies in --storage", group="search")("search")
    min_compression: float = Setting((float,), "static phase: low end of the bisection",
                                     in_range(0, 1, lo_open=True), group="search")(0.1)
    max_compression: float = Setting((float,), "static phase: high end (equal to --min_compression: that one "
                                     "compression)", (lambda v: v < 1, "must be in [--min_compression, 1)"),
                                     group="search")(0.9)
    static_trials: int = Setting((int,), "stage-2 runs of the static phase, at most", in_range(1),
                                 group="search")(6)
    dynamic_trials: int = Setting((int,), "stage-3 runs per network of the dynamic phase, at most", in_range(0),
                                  group="search")(6)
    dynamic_networks: int = Setting((int,), "static networks the dynamic phase starts from: the most compressed "
                                    "within budget, and this many - 1 of the next ones", in_range(1),
                                    group="search")(1)
    knob: str = Setting((str,), "what the dynamic phase bisects: stage 3's --target_gflops (the default) or "
                        "--alpha (a fixed skip reward: steadier where the dual ascent and the final calibration "
                        "cost accuracy)", choices=DYNAMIC_KNOBS, group="search")("target_gflops")
    max_alpha: float = Setting((float,), "high end of alpha (--knob alpha)", in_range(0, lo_open=True),
                               group="search")(10.0)
    prune_config: str = Setting((str, NULL), "stage-2 config of every static trial (epochs, lr, fisher_batches ...; "
                                "target, data and result keys are set by the search)", group="stages",
                                flag={"metavar": "PATH"})(None)
    rl_epochs: int = Setting((int,), "stage 3: --epochs", group="stages")(100)
    rl_lr: float = Setting((float,), "stage 3: --lr", group="stages")(0.001)
    rl_bs: int = Setting((int,), "stage 3: --bs", group="stages")(256)
    rl_weight: float = Setting((float,), "stage 3: --rl_weight", group="stages")(0.1)
    gamma: float = Setting((float,), "stage 3: --gamma", group="stages")(1.0)
    rl_alpha: float = Setting((float,), "stage 3: --alpha, where the knob is the GFLOPs target (the dual ascent's "
                              "starting value)", group="stages")(0.1)
    rl_route_epochs: int = Setting((int,), "stage 3: --route_epochs", group="stages")(0)
    rl_route_lr: float = Setting((float, NULL), "stage 3: --route_lr (default: its own, --rl_lr / 10)",
                                 group="stages")(None)


def baseline(study, stage1_path, data, eval_bs, ctx):
    """The unpruned network (every block, no switch) on the validation split; kept in the study so that
    every worker and every resumed run compares with the same number."""
    if "baseline" not in study.user_attrs:
        net = predict.load(stage1_path, DataSettings.of(data, bs=eval_bs, final_split="val"), ctx, ("sp",),
                           "--checkpoint")
        r = evaluate(net.ddp, net.data.eval, ctx, net.costs, mode="open", desc="val")
        study.set_user_attr("baseline", {"val_acc": r["acc"], "val_gflops": r["gflops"],
                                         "params": count_params(net.model), "val_images": r["images"]})
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


def feasible(study):
    """The study's finished trials within the budget."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("feasible")]


def dynamic_knob(name, static, max_alpha):
    """Stage 3's knob on one static network: a GFLOPs target between the network with every gated block
    skipped and the static network itself (met within 3%), or alpha in [0, max_alpha]."""
    if name == "alpha":
        return Knob("alpha", 0.0, max_alpha, "high", max_alpha / 64)
    floor = to_gflops(skipped_flops(predict.checkpoint_costs(static["checkpoint"], ("prune",), "--checkpoint")))
    return Knob("target_gflops", floor, static["val_gflops"], "low", 0.03 * static["val_gflops"])


class Search:
    """One search, as one worker runs it: `args` main_search.py's settings, `trials` the runner of its trials
    (search.trials.Trials), `eval_bs` the batch size of its own evaluations."""

    def __init__(self, args, trials, stage1_path, eval_bs, knob_name, ctx):
        self.args, self.trials, self.stage1_path, self.eval_bs = args, trials, stage1_path, eval_bs
        self.knob_name, self.ctx = knob_name, ctx
        self.search_dir = os.path.dirname(trials.root)
        self.base = self.threshold = self.storage = None

    def run(self, storage, t0):
        """Both phases on the studies of `storage`, then the report (unless another worker writes it)."""
        args, trials, data = self.args, self.trials, self.trials.data
        self.storage = storage
        settings = {"budget": args.budget, "val_split": data["val_split"], "seed": data["seed"],
                    "resize": data["resize"], "prune_config": trials.prune_config,
                    "compressions": [args.min_compression, args.max_compression]}
        knob_c = Knob("compression", args.min_compression, args.max_compression, "high", 0.01)  # within 1 point
        static_study = open_study(storage, f"{args.study_name}.static", knob_c, settings)
        self.base = baseline(static_study, self.stage1_path, data, self.eval_bs, self.ctx)
        threshold = self.threshold = self.base["val_acc"] - args.budget
        print(f"[search] unpruned network: val acc {self.base['val_acc']:.2f}% on {self.base['val_images']} "
              f"validation images; trials must reach {threshold:.2f}%", flush=True)
        worker = Worker(trials.root)

        worker.run_phase(static_study, knob_c, args.static_trials,
                         lambda c, folder: judged(trials.static(c, folder), threshold),
                         line("static", "compression", threshold))
        statics = sorted(feasible(static_study), key=lambda t: -t.user_attrs["compression"])
        dynamic_studies, idle = [], []  # idle: why the dynamic phase ran no trial on a static network
        for t in statics[:args.dynamic_networks] if args.dynamic_trials else []:
            c = t.params["compression"]
            knob = dynamic_knob(self.knob_name, t.user_attrs, args.max_alpha)
            why = no_trial_reason(knob)
            if why:
                ends = " (GFLOPs from the network with every gated block skipped to the static network itself)" \
                    if knob.name == "target_gflops" else ""
                idle.append(f"on the network at compression {c:.6g}{ends}, {why}")
                print(f"[search] dynamic (compression {c:.6g}): no trial{ends}: {why}", flush=True)
                continue
            study = open_study(storage, f"{args.study_name}.dynamic.c{label(c)}", knob,
                               {**settings, "rl": record_of(trials.rl_settings),
                                "knob": [knob.name, knob.low, knob.high]})
            worker.run_phase(study, knob, args.dynamic_trials,
                             lambda x, folder, src=t.user_attrs["checkpoint"]: judged(
                                 trials.dynamic(src, knob.name, x, folder), threshold),
                             line(f"dynamic (compression {c:.6g})", knob.name, threshold))
            dynamic_studies.append((c, study))
        notes = missing_notes(static_study, dynamic_studies, bool(statics), args.dynamic_trials, idle)
        self.report(static_study, statics, dynamic_studies, notes, t0)

    def report(self, static_study, statics, dynamic_studies, notes, t0):
        """Choose, evaluate the chosen networks once on test, write trials.json, pareto.png and the table.
        `statics`: the static trials within the budget, most compressed first."""
        base, threshold, search_dir = self.base, self.threshold, self.search_dir
        dynamics = [(c, t) for c, s in dynamic_studies for t in feasible(s)]
        chosen = {"sp": {"checkpoint": os.path.abspath(self.stage1_path), "mode": "open"}}
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
        tested = run_alone(self.storage, f"{self.args.study_name}.final", lambda: evaluate_on_test(
            chosen, self.trials.data, self.eval_bs, self.ctx, os.path.join(search_dir, "final")))
        if tested is None:
            print("[search] the final test evaluation is being done by another worker", flush=True)
            return
        rows = table_rows(tested, info, base["params"], notes)
        text = write_table(search_dir, rows, self.args.budget, base["val_acc"], {
            "this_call_seconds": time.time() - t0,
            "trial_seconds_total": sum(r.get("seconds", 0) for r in records),
            "trials": len(points)})
        print(f"\n{text}-> {search_dir}/table.md, table.json, trials.json, pareto.png "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)

