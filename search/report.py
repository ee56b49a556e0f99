"""The end of a search: the chosen networks evaluated once on the test split, the three-row table with the
settings found, every trial's result and the accuracy / GFLOPs picture (the files: docs/search.md)."""
import os

from optuna.trial import TrialState

from runtime import predict
from runtime.evaluate import evaluate
from utils.files import read_json, write_json
from utils.flops import compression, count_params
from utils.lineage import STAGES
from utils.data import DataSettings
from runtime.table import save_table, table_row, to_markdown


def evaluate_on_test(chosen, data, bs, ctx, final_dir):
    """Evaluate each chosen network {row: {"checkpoint", "mode"}} once on the test split, unless its
    final/<row>.json holds the same checkpoint -> {row: test_acc, gflops_per_image ...}. One worker at a time."""
    os.makedirs(final_dir, exist_ok=True)
    out, loaded = {}, None
    for row, spec in chosen.items():
        path = os.path.join(final_dir, f"{row}.json")
        if os.path.isfile(path):
            kept = read_json(path)
            if kept["checkpoint"] == spec["checkpoint"] and kept["mode"] == spec["mode"]:
                out[row] = kept
                continue
        # the test split is decoded only when a network needs it, and once
        net = predict.load(spec["checkpoint"], DataSettings.of(data, bs=bs), ctx, data=loaded)
        loaded = net.data
        r = evaluate(net.ddp, loaded.test, ctx, net.costs, mode=spec["mode"], desc=f"test {row}")
        out[row] = {"test_acc": r["acc"], "test_loss": r["loss"], "gflops_per_image": r["gflops"],
                    "params": count_params(net.model), "test_images": r["images"], **spec}
        write_json(path, out[row])
    return out


def _ran(studies, phase):
    """"<n> <phase> trials ran, none within the budget ...", or None when none ran."""
    trials = [t for s in studies for t in s.get_trials(deepcopy=False)]
    failed = sum(t.state == TrialState.FAIL and "error" in t.user_attrs for t in trials)
    n = failed + sum(t.state == TrialState.COMPLETE for t in trials)
    if not n:
        return None
    failures = f" ({failed} failed, counted as outside the budget)" if failed else ""
    return f"{n} {phase} trial{'s' if n != 1 else ''} ran{failures}, none within the budget on the validation split"


def missing_notes(static_study, dynamic_studies, any_static, dynamic_trials, idle):
    """{row: why it has no network}: its phase ran no trial (and why: `idle`), or none of its trials is within
    the budget. `dynamic_studies`: [(compression, study)]."""
    static = _ran([static_study], "static") or "the static phase ran no trial"
    if not dynamic_trials:
        dynamic = "the dynamic phase was not run (--dynamic_trials 0)"
    elif not any_static:
        dynamic = "the dynamic phase ran no trial: no static network within the budget to start from"
    else:
        dynamic = _ran([s for _, s in dynamic_studies], "dynamic")
        if dynamic is None:
            dynamic = "the dynamic phase ran no trial" + (": " + "; ".join(idle) if idle else "")
        elif idle:
            dynamic += "; no trial " + "; ".join(idle)
    return {"prune": static, "rl": dynamic}


def table_rows(tested, chosen_info, params_stage1, notes=None):
    """The three rows in runtime/table.py's format, each with the settings found and its validation numbers;
    a row without a network gets its note from `notes` ({row: why}, missing_notes)."""
    rows = []
    for stage, method in ((s.name, s.method) for s in STAGES.values()):
        t, info = tested.get(stage), chosen_info.get(stage)
        row = table_row(stage, method, t is not None)
        if t is None:
            row["note"] = (notes or {}).get(stage) or "no trial within the budget on the validation split"
        else:
            row.update(accuracy=t["test_acc"], gflops_per_image=t["gflops_per_image"], params=t["params"],
                       compression=compression(t["params"], params_stage1))
        rows.append({**row, **(info or {})})
    return rows


def write_table(search_dir, rows, budget, baseline, extra):
    """table.md (runtime/table.py's Markdown + the settings found) and table.json; returns the Markdown."""
    lines = [f"Chosen on the validation split: within {budget:g} points of the unpruned network's "
             f"{baseline:.2f}% (at least {baseline - budget:.2f}%); each chosen network evaluated once on test."]
    for r in rows:
        if r.get("settings"):
            found = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["settings"].items())
            lines.append(f"- {r['method']}: {found}; validation {r['val_acc']:.2f}% at {r['val_gflops']:.4g} GFLOPs")
    text = to_markdown(rows) + "\n" + "\n".join(lines) + "\n"
    save_table(search_dir, text, rows, budget=budget, baseline_val_acc=baseline, **extra)
    return text


def pareto_front(points):
    """The points no other point beats in both validation accuracy (higher) and GFLOPs (lower)."""
    return [p for p in points if not any(q["val_acc"] >= p["val_acc"] and q["val_gflops"] <= p["val_gflops"]
                                         and (q["val_acc"], q["val_gflops"]) != (p["val_acc"], p["val_gflops"])
                                         for q in points)]


def plot(points, baseline, threshold, chosen, path):
    """pareto.png (docs/search.md); one line instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[search] matplotlib missing: no pareto.png (pip install matplotlib)", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for kind, marker, color in (("static", "^", "tab:blue"), ("static+dynamic", "o", "tab:orange")):
        pts = [p for p in points if p["kind"] == kind]
        ax.scatter([p["val_gflops"] for p in pts], [p["val_acc"] for p in pts], marker=marker, color=color,
                   label=f"{kind} trials ({len(pts)})", zorder=3)
    front = sorted(pareto_front(points), key=lambda p: p["val_gflops"])
    ax.step([p["val_gflops"] for p in front], [p["val_acc"] for p in front], where="post", color="gray", lw=1,
            label="Pareto front")
    ax.plot(baseline["val_gflops"], baseline["val_acc"], "*", color="crimson", ms=14, mec="black",
            label="w/o pruning")
    ax.axhline(threshold, color="crimson", ls="--", lw=1, label="budget")
    for p in chosen:
        ax.plot(p["val_gflops"], p["val_acc"], "o", ms=14, mfc="none", mec="black", mew=1.5)
    ax.set(xlabel="GFLOPs / image (validation split)", ylabel="accuracy (%, validation split)",
           title="Search trials (circled: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
