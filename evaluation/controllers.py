"""Stage 3's controllers compared on validation: the same stage-2 network, the same epochs, the same GFLOPs
target, only --controller differs. This is how the default controller is chosen (docs/stages.md).

Data: scikit-learn's digits at 16x16 with graded difficulty (evaluation/digits.digits_images, 5 levels of
contrast and noise), its train split only: every stage holds out the same validation split (--val_split,
drawn by --seed) and ends on it (--final_split val); the test split is never read. Per seed: stage 1
(ResNet-20 width 1, crop augmentation), stage 2 (compression 0.6), then stage 3 once per controller from
that stage-2 network, to a GFLOPs target `budget` of the way from every gated block skipped to every
block run (the switches' FLOPs counted), with the same epochs, route epochs and learning rates.

    python -m evaluation.controllers                     # 3 seeds, counterfactual against gumbel (about 30 min
                                                    # on 2 idle cores)
    python -m evaluation.controllers --quick --out DIR --results DIR   # the same code path in a minute

Writes <results>/controllers.json (per seed and controller: val accuracy, GFLOPs, alpha, the ending) and
.md (the table); the work goes under <out> (default evaluation/out/controllers), reused by a rerun of the same
command (evaluation/runner.py).
"""
import argparse
import os

import numpy as np

from evaluation.digits import write_digits
from evaluation.runner import Task, run_all
from evaluation.stats import pooled_report
from runtime.predict import checkpoint_costs, load, predict
from utils.cli import Parser
from utils.data import DataSettings
from utils.errors import run_main
from utils.dist import setup
from utils.files import read_json, write_json
from utils.flops import skipped_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALES = {
    "digits": dict(resize=16, depth=20, width=1, bs=64, val_split=0.2, seeds=(0, 1, 2), levels=5,
                   sp=dict(epochs=15, lr=0.1),
                   prune=dict(compression=0.6, epochs=5, lr=0.02, fisher_batches=16),
                   rl=dict(epochs=12, lr=0.05, alpha=1.0, route_epochs=6, route_lr=0.02),
                   own={"counterfactual": ["--rl_weight", "0.01"], "gumbel": [], "reinforce": ["--rl_weight", "0.01"]},
                   budget=0.5),
    "quick": dict(resize=8, depth=8, width=1, bs=32, val_split=0.2, seeds=(0,), levels=3,
                  sp=dict(epochs=1, lr=0.05),
                  prune=dict(compression=0.5, epochs=1, lr=0.01, fisher_batches=2),
                  rl=dict(epochs=1, lr=0.01, alpha=1.0, route_epochs=1, route_lr=0.01),
                  own={"counterfactual": ["--rl_weight", "0.01"], "gumbel": [], "reinforce": ["--rl_weight", "0.01"]},
                  budget=0.5),
}


def target_step(unit, budget):
    """The GFLOPs target of a seed's stage 3: `budget` of the way from every gated block skipped to every
    block run, of its stage-2 network (switches included, as stage 3 counts them)."""
    path = os.path.join(unit, "prune", "checkpoint.pt")
    costs = checkpoint_costs(path, ("prune",))
    gflops = (skipped_flops(costs) + budget * sum(costs["blocks"])) / 1e9
    write_json(os.path.join(unit, "target.json"), {"gflops": gflops, "budget": budget})


def val_correct(path):
    """Per validation image (in the split's order), whether the stage-3 network saved at `path` classifies it
    right on its greedy routes: the split the run held out, read through its recorded pipeline."""
    from runtime.checkpoint import load_checkpoint
    settings = DataSettings.of(load_checkpoint(path, ("rl",))["args"])
    net = load(path, settings, setup("cpu", 0, "off", False), ("rl",))
    return predict(net.ddp, net.data.eval).correct.numpy()


def plan(s, out, data, controllers):
    tasks = []
    me = ["-m", "evaluation.controllers"]
    for seed in s["seeds"]:
        u = os.path.join(out, f"s{seed}")
        common = ["--bs", str(s["bs"]), "--num_workers", "0", "--seed", str(seed), "--device", "cpu",
                  "--data_dir", data, "--val_split", str(s["val_split"]), "--final_split", "val"]
        cfg = os.path.join(u, "prune_config.json")
        prune = {"result_dir": u, "data_dir": data, "num_workers": 0, "prune_mode": "one_pass",
                 "compression": s["prune"]["compression"], "epochs": s["prune"]["epochs"], "lr": s["prune"]["lr"],
                 "bs": s["bs"], "fisher_batches": s["prune"]["fisher_batches"], "seed": seed, "device": "cpu",
                 "val_split": s["val_split"], "final_split": "val", "round_to": 1, "criterion": "score"}
        tasks += [
            Task(f"s{seed}/sp", ["main_sp.py", "--network", "resnet", "--depth", str(s["depth"]), "--width",
                                 str(s["width"]), "--epochs", str(s["sp"]["epochs"]), "--lr", repr(s["sp"]["lr"]),
                                 "--resize", str(s["resize"]), "--augment", "crop", "--result_dir", u, *common],
                 os.path.join(u, "sp", "metrics.json")),
            Task(f"s{seed}/prune", ["main_prune.py", "--config_path", cfg], os.path.join(u, "prune", "metrics.json"),
                 [f"s{seed}/sp"], prune, cfg),
            Task(f"s{seed}/target", [*me, "target", u, "--budget", repr(s["budget"])], os.path.join(u, "target.json"),
                 [f"s{seed}/prune"])]
        r = s["rl"]
        for c in controllers:
            tasks.append(Task(f"s{seed}/{c}", lambda u=u, c=c, common=common: [
                "main_rl_prune.py", "--checkpoint", os.path.join(u, "prune", "checkpoint.pt"),
                "--result_dir", os.path.join(u, c), "--controller", c,
                "--target_gflops", repr(read_json(os.path.join(u, "target.json"))["gflops"]),
                "--epochs", str(r["epochs"]), "--lr", repr(r["lr"]), "--alpha", repr(r["alpha"]), *s["own"][c],
                "--route_epochs", str(r["route_epochs"]), "--route_lr", repr(r["route_lr"]), *common],
                os.path.join(u, c, "rl", "metrics.json"), [f"s{seed}/target"]))
    return tasks


def report(s, out, controllers):
    rows = []
    for seed in s["seeds"]:
        u = os.path.join(out, f"s{seed}")
        prune = read_json(os.path.join(u, "prune", "metrics.json"))
        row = {"seed": seed, "target_gflops": read_json(os.path.join(u, "target.json"))["gflops"],
               "static": {"val_acc": prune["val_acc"], "val_gflops": prune["val_gflops"]}}
        for c in controllers:
            m = read_json(os.path.join(u, c, "rl", "metrics.json"))
            row[c] = {"val_acc": m["val_acc"], "val_gflops": m["val_gflops"], "alpha_final": m["alpha_final"],
                      "val_images": m["val_images"], "exec_rate": m["exec_rate"],
                      "calibration": m["ending"].get("calibration")}
        rows.append(row)
    mean = {c: {k: float(np.mean([r[c][k] for r in rows])) for k in ("val_acc", "val_gflops")}
            for c in ("static", *controllers)}
    base = controllers[0]
    correct = {c: [val_correct(os.path.join(out, f"s{seed}", c, "rl", "checkpoint.pt")) for seed in s["seeds"]]
               for c in controllers}
    for c in controllers:  # the per-image evaluation is the runs' own
        for row, hits in zip(rows, correct[c]):
            assert abs(100 * hits.mean() - row[c]["val_acc"]) < 1e-6, (c, row["seed"])
    diffs = {c: [r[c]["val_acc"] - r[base]["val_acc"] for r in rows] for c in controllers[1:]}
    return {"scale": s["name"], "resize": s["resize"], "depth": s["depth"], "budget": s["budget"],
            "seeds": list(s["seeds"]), "rows": rows, "mean": mean,
            "diff_vs_" + base: {c: {"per_seed": d, "mean": float(np.mean(d)),
                                   "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d),
                                   # paired per image, seeds pooled (the bootstrap within each seed's split)
                                   "paired": pooled_report(correct[c], correct[base])}
                               for c, d in diffs.items()}}


def markdown(r, controllers, command):
    base = controllers[0]
    n = r["rows"][0][base]["val_images"]
    lines = [f"# Stage 3's controllers on validation ({r['scale']})", "",
             f"Digits of graded difficulty at {r['resize']}x{r['resize']}, ResNet-{r['depth']}; the same stage-2 "
             f"network per seed, every controller trained to the same GFLOPs target ({r['budget']:.0%} of the "
             f"way from every gated block skipped to every block run) with the same epochs; {n} validation "
             f"images per seed (one image = "
             f"{100 / n:.2f} points); the test split is never read. Reproduce: `{command}`.", "",
             "| seed | target GFLOPs | static (stage 2, every block) | " + " | ".join(controllers) + " |",
             "|---|---|---|" + "---|" * len(controllers)]
    cell = lambda m: f"{m['val_acc']:.2f}% at {m['val_gflops']:.5f}"  # noqa: E731
    for row in r["rows"]:
        lines.append(f"| {row['seed']} | {row['target_gflops']:.5f} | {cell(row['static'])} | "
                     + " | ".join(cell(row[c]) for c in controllers) + " |")
    lines.append("| mean | | " + " | ".join(cell(r["mean"][c]) for c in ("static", *controllers)) + " |")
    lines.append("")
    for c, d in r["diff_vs_" + base].items():
        q = d["paired"]
        lines.append(f"{c} - {base}: {d['mean']:+.2f} points on average "
                     f"({', '.join(f'{x:+.2f}' for x in d['per_seed'])}; better in {d['wins']} of "
                     f"{len(d['per_seed'])} seeds, worse in {d['losses']}). Paired over the {q['n']} validation "
                     f"images of all seeds: 95% CI [{q['ci']['low']:+.2f}, {q['ci']['high']:+.2f}] (bootstrap "
                     f"within each seed), McNemar p {q['mcnemar']['p']:.3g} (two-sided; right only with {c} / "
                     f"only with {base}: {q['mcnemar']['only_a']} / {q['mcnemar']['only_b']}); "
                     f"{q['power']['text']}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", default="all", choices=("all", "target"))
    p.add_argument("unit", nargs="?", help="a seed's folder (the step target)")
    p.add_argument("--budget", type=float, default=None, help="(the step target)")
    p.add_argument("--quick", action="store_true", help="a tiny scale: the same code path in a minute")
    p.add_argument("--controllers", nargs="+", default=["counterfactual", "gumbel"],
                   choices=("counterfactual", "gumbel", "reinforce"), help="the first is the one compared against")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--out", default=None, help="the work (default: evaluation/out/controllers[-quick])")
    p.add_argument("--results", default=None, help="where controllers.{md,json} go (default: evaluation/results; "
                                                   "with --quick, the work folder)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.step == "target":
        return target_step(args.unit, args.budget)
    name = "quick" if args.quick else "digits"
    s = {**SCALES[name], "name": name}
    if args.seeds:
        s["seeds"] = tuple(args.seeds)
    default_out = os.path.join(ROOT, "evaluation", "out", "controllers" + ("-quick" if args.quick else ""))
    out = os.path.abspath(args.out or default_out)
    results = args.results or (out if args.quick else os.path.join(ROOT, "evaluation", "results"))
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "test")):
        write_digits(data + ".partial", size=s["resize"], seed=0, levels=s["levels"])
        os.replace(data + ".partial", data)
    run_all(plan(s, out, data, args.controllers), args.jobs, args.threads, os.path.join(out, "logs"))
    r = report(s, out, args.controllers)
    command = "python -m evaluation.controllers" + (" --quick" if args.quick else "") + (
        f" --seeds {' '.join(map(str, s['seeds']))}" if args.seeds else "") + (
        f" --controllers {' '.join(args.controllers)}" if args.controllers != ["counterfactual", "gumbel"] else "")
    os.makedirs(results, exist_ok=True)
    write_json(os.path.join(results, "controllers.json"), r)
    text = markdown(r, args.controllers, command)
    with open(os.path.join(results, "controllers.md"), "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    run_main(main)
