"""The study's report: means over seeds, the picture's points and the Markdown tables of evaluation/study.py, from
the per-seed results it collects (each number from the JSON a stage script wrote)."""
import statistics


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def optional(fn, *args):
    """fn(*args), or None where a task's output is missing (a study stopped early reports what it has)."""
    try:
        return fn(*args)
    except (FileNotFoundError, KeyError, IndexError, TypeError, RuntimeError):
        return None


def summarise(per_seed):
    """Means and sample std over the seeds of every headline number."""
    def over(get):
        return mean_std([optional(get, r) for r in per_seed])
    return {
        "row1_acc": over(lambda r: r["row1"]["test_acc"]), "dense_acc": over(lambda r: r["dense"]["test_acc"]),
        "static_acc": over(lambda r: r["static"]["test_acc"]),
        "static_gflops": over(lambda r: r["static"]["gflops_per_image"]),
        "dynamic_acc": over(lambda r: r["dynamic"]["test_acc"]),
        "dynamic_gflops": over(lambda r: r["dynamic"]["gflops_per_image"]),
        "gflops_reduction": over(lambda r: r["gflops_reduction"]), "dynamic_drop": over(lambda r: r["dynamic_drop"]),
        "static_equal_acc": over(lambda r: r["static_equal"]["test_acc"]),
        "static_equal_gflops": over(lambda r: r["static_equal"]["gflops_per_image"]),
        **{f"route_{w}_{k}_{m}": over(lambda r, w=w, k=k, m=m: r[f"route_{w}_weights"][k][m])
           for w in ("stage3", "stage2") for k in ("at_or_under", "over") for m in ("test_acc", "gflops_per_image")}}


def points(per_seed):
    """The picture's points: every seed's networks (test accuracy, GFLOPs per image as executed)."""
    pts = []

    def add(kind, seed, acc, gflops):
        pts.append({"kind": kind, "seed": seed, "test_acc": acc, "gflops_per_image": gflops})
    for r in per_seed:
        seed = r["seed"]
        add("w/o pruning (row 1)", seed, r["row1"]["test_acc"], r["row1"]["gflops_per_image"])
        if r.get("dense"):
            add("plain dense training", seed, r["dense"]["test_acc"], r["row1"]["gflops_per_image"])
        if r.get("static"):
            add("static only", seed, r["static"]["test_acc"], r["static"]["gflops_per_image"])
            add("static + dynamic (per-image routes)", seed, r["dynamic"]["test_acc"], r["dynamic"]["gflops_per_image"])
        if r.get("static_equal"):
            add("static only, pushed to equal GFLOPs", seed, r["static_equal"]["test_acc"],
                r["static_equal"]["gflops_per_image"])
        for w, label in (("stage3", "stage-3 weights"), ("stage2", "stage-2 weights")):
            for k, v in (r.get(f"route_{w}_weights") or {}).items():
                if v:
                    add(f"best fixed route ({label}, {'under' if k == 'at_or_under' else 'over'} budget)", seed,
                        v["test_acc"], v["gflops_per_image"])
    return pts


# ---------------------------------------------------------------------------------------- Markdown

def pm(stat, scale=1.0, digits=2):
    return "-" if stat is None else f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def num(x, digits=2, scale=1.0):
    return "-" if x is None else f"{scale * x:.{digits}f}"


def get(r, *keys):
    for k in keys:
        if r is None:
            return None
        r = r.get(k) if isinstance(r, dict) else None
    return r


def setting_text(c):
    if c is None:
        return "no setting"
    if "alpha" in c:
        return f"alpha {c['alpha']:.4g}"
    return (f"a GFLOPs target of {c['target_gflops']:.4g} (where it lies, {100 * c['fraction']:.1f}% of the way "
            f"from the static network with every gated block skipped to the static network, is what the other "
            f"seeds get)")


def markdown(s, per_seed, mean, flags, setting, timing, command, equal_epochs):
    n = len(per_seed)
    data = {"digits": "Digits (scikit-learn, 1,797 images, 32x32 PNG)",
            "digits-mixed": "Digits with a spread of difficulty (scikit-learn, 1,797 images, 32x32 PNG; half of "
                            "them, train and test alike, with contrast halved and Gaussian noise of std 64)"}.get(
        s["data"], f"Synthetic images ({s['resize']}x{s['resize']} PNG)")
    L = [f"{data}, ResNet-{s['depth']} width {s['width']}, validation split {s['val_split']:g} of train, "
         f"{n} seed{'s' * (n > 1)} (mean ± sample std). Stage 1: {s['sp']['epochs']} epochs "
         f"({s['sp']['dense_epochs']} dense, then --train_mode {s['sp']['train_mode']}); stage 2: compression "
         f"{s['prune']['compression']:g}, {s['prune']['epochs']} epochs; stage 3: {s['rl']['epochs']} epochs, lr "
         f"{s['rl']['lr']:g}, rl_weight {s['rl']['rl_weight']:g} per image, gamma {s['rl']['gamma']:g}"
         + (f", knob {s['search']['knob']}" + (f" (dual ascent from alpha {s['rl']['alpha']:g})"
                                                if s['search']['knob'] == "target_gflops" else ""))
         + (f", then {s['rl']['route_epochs']} epochs on the greedy routes" if s['rl'].get('route_epochs') else "")
         + ". "
         f"Reproduce: `{command}`.", "", "**1. Row 1 against plain dense training** (same net, same epochs; "
         "test accuracy %)", "", "| Seed | Row 1 (dense start + switches), every block | its greedy routes | "
         "plain dense (--train_mode open) |", "|---|---|---|---|"]
    for r in per_seed:
        L.append(f"| {r['seed']} | {num(r['row1']['test_acc'])} | {num(r['row1']['routed_acc'])} | "
                 f"{num(get(r, 'dense', 'test_acc'))} |")
    L.append(f"| mean | {pm(mean['row1_acc'])} | | {pm(mean['dense_acc'])} |")
    if flags:
        b, a = flags["before"], flags["after"]
        L += ["", f"**2. Stage 3 at the original flags** (alpha {flags['flags']['alpha']:g}, gamma "
              f"{flags['flags']['gamma']:g}, rl_weight {flags['flags']['rl_weight']:g}, lr {flags['flags']['lr']:g}; "
              f"{flags['epochs']} epochs from the static network of seed {s['seeds'][0]}; validation split):", "",
              "| | " + " | ".join(f"switch {j + 1}" for j in range(len(b["exec_rate"]))) + " | val acc (%) | GFLOPs |",
              "|---|" + "---|" * (len(b["exec_rate"]) + 2)]
        for name, x in (("greedy execution rate before", b), ("after", a)):
            L.append(f"| {name} | " + " | ".join(f"{100 * v:.0f}%" for v in x["exec_rate"]) +
                     f" | {x['val_acc']:.2f} | {x['gflops_per_image']:.4f} |")
    L += ["", f"**3. Static + dynamic against static only** at compression {s['prune']['compression']:g} "
          f"({setting_text(setting)} chosen by main_search.py on the validation split "
          f"of seed {s['seeds'][0]}, budget {s['search']['budget']:g} point, and applied to every seed; test "
          "accuracy %)", "", "| Seed | Unpruned | Static only | GFLOPs | Static + dynamic | GFLOPs | GFLOPs "
          "reduction | Drop vs unpruned (points) |", "|---|---|---|---|---|---|---|---|"]
    for r in per_seed:
        L.append(f"| {r['seed']} | {num(r['row1']['test_acc'])} | {num(get(r, 'static', 'test_acc'))} | "
                 f"{num(get(r, 'static', 'gflops_per_image'), 4)} | {num(get(r, 'dynamic', 'test_acc'))} | "
                 f"{num(get(r, 'dynamic', 'gflops_per_image'), 4)} | {num(r.get('gflops_reduction'), 1, 100)}% | "
                 f"{num(r.get('dynamic_drop'))} |")
    L.append(f"| mean | {pm(mean['row1_acc'])} | {pm(mean['static_acc'])} | {pm(mean['static_gflops'], digits=4)} | "
             f"{pm(mean['dynamic_acc'])} | {pm(mean['dynamic_gflops'], digits=4)} | "
             f"{pm(mean['gflops_reduction'], 100, 1)}% | {pm(mean['dynamic_drop'])} |")
    goals = [("GFLOPs reduction >= 25%", mean["gflops_reduction"], lambda m: m >= 0.25),
             ("within 1 point of unpruned", mean["dynamic_drop"], lambda m: m <= 1.0)]
    L += ["", "Goals (on the means): " + ", ".join(
        f"{name}: {'-' if m is None else ('yes' if ok(m['mean']) else 'NO')}" for name, m, ok in goals) + "."]
    L += ["", "**4. At equal GFLOPs**: per-image routing against the best fixed route (the same blocks skipped "
          "for every image, chosen greedily on the validation split, BN re-estimated under the route; 'under' "
          "is the greedy route at or under the budget, 'over' the one greedy step before it) and against "
          f"static pruning alone pushed to the same GFLOPs (stage 2's `gflops` key, {equal_epochs} fine-tuning "
          "epochs: as many as the per-image network trained after pruning; test accuracy % at GFLOPs)",
          "", "| Seed | Per-image routing | Fixed route, stage-3 weights, under / over | Fixed route, stage-2 "
          "weights, under / over | Static only at equal GFLOPs |", "|---|---|---|---|---|"]

    def at(x):
        return "-" if not x else f"{x['test_acc']:.2f} @ {x['gflops_per_image']:.4f}"
    for r in per_seed:
        w3, w2 = r.get("route_stage3_weights") or {}, r.get("route_stage2_weights") or {}
        L.append(f"| {r['seed']} | {at(r.get('dynamic'))} | {at(w3.get('at_or_under'))} / {at(w3.get('over'))} | "
                 f"{at(w2.get('at_or_under'))} / {at(w2.get('over'))} | {at(r.get('static_equal'))} |")

    def mat(prefix):
        a, g = mean[f"{prefix}_acc" if "route" not in prefix else f"{prefix}_test_acc"], \
            mean[f"{prefix}_gflops" if "route" not in prefix else f"{prefix}_gflops_per_image"]
        if a is None:
            return "-"
        seeds = "" if a["n"] == n else f" ({a['n']} seed{'s' * (a['n'] > 1)})"
        return f"{a['mean']:.2f} ± {a['std']:.2f} @ {g['mean']:.4f}{seeds}"
    L.append(f"| mean | {mat('dynamic')} | {mat('route_stage3_at_or_under')} / {mat('route_stage3_over')} | "
             f"{mat('route_stage2_at_or_under')} / {mat('route_stage2_over')} | {mat('static_equal')} |")
    if any(r.get("by_difficulty") for r in per_seed):
        L += ["", "**5. Routes by difficulty** (test images, hard: contrast halved and noise added; easy: as "
              "written; accuracy %, GFLOPs per image as executed, greedy execution rate per switch)", "",
              "| Seed | Network | Images | Accuracy | GFLOPs | Execution rate per switch |",
              "|---|---|---|---|---|---|"]
        for r in per_seed:
            for name, label in (("static", "static only"), ("dynamic", "static + dynamic")):
                for group, g in (get(r, "by_difficulty", name) or {}).items():
                    rates = " / ".join(f"{100 * x:.0f}" for x in g["exec_rate"])
                    L.append(f"| {r['seed']} | {label} | {group} ({g['images']}) | {g['acc']:.2f} | "
                             f"{g['gflops_per_image']:.4f} | {rates} |")
    L += ["", "![accuracy vs GFLOPs](study.png)", "", timing_line(timing)]
    return "\n".join(L) + "\n"


def timing_line(timing):
    searches = timing["search_seconds"]
    line = "".join(f"The search (main_search.py, {k.split('/')[1]}) took {v / 60:.1f} min wall time. "
                   for k, v in searches.items() if v)
    full = timing["from_scratch"]
    if full:
        return line + (f"Wall time of the whole study from scratch: {full['wall_seconds'] / 60:.1f} min on 2 CPU "
                       f"cores shared with other work ({timing['jobs']} jobs at once; finished {full['finished']}).")
    return line + (f"Wall time from scratch not measured for these settings; the tasks took "
                   f"{timing['task_seconds_total'] / 60:.1f} job-minutes ({timing['jobs']} jobs at once).")
