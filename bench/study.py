"""The real-image study on CPU: scikit-learn's digits through the three stage scripts, three seeds, an
alpha x compression sweep, the Torch-Pruning comparison and the accuracy / GFLOPs picture.

    pip install -c <(echo torch==2.14.1) -r bench/requirements.txt
    nice -n 10 python bench/study.py                 # the study of bench/results/ (about an hour, 2 cores)
    python bench/study.py --quick --out DIR --results DIR   # the same code path in seconds (the smoke test)

Every number comes from the stage scripts run as subprocesses exactly as a user runs them (python main_sp.py
..., python main_prune.py --config_path <generated json>, python main_rl_prune.py ...) and from the
metrics.json files they write; nothing here trains or prunes on its own except the Torch-Pruning peer
(bench/peer_torch_pruning.py). Layout under --out (default bench/out/study, git-ignored):

    data/                      the dataset in the PNG class-folder layout
    seed<s>/{sp,prune,rl}/     the main pipeline of seed s (compression MAIN_COMPRESSION, alpha MAIN_ALPHA)
    seed<s>/peer/              Torch-Pruning models and the latency measurements (seed 0)
    sweep/c<c>/prune/          stage 2 of the sweep (from seed 0's stage-1 checkpoint)
    sweep/c<c>/a<alpha>/rl/    stage 3 of the sweep
    logs/<task>.log            every subprocess's output

Results (--results, default bench/results/): study.json (everything, with mean and sample std over seeds),
study.md (the README's tables), study_points.json and study.png (the picture).

Jobs run --jobs at a time (default 2), each with --threads torch threads (default 1): on a 2-core machine
two single-threaded processes beat one process with two threads, and a busy machine punishes
oversubscribed threads. The latency measurement runs alone, last. A task whose outputs exist from the
same command is not run again (delete --out to start afresh).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.synthetic import write_digits, write_synthetic  # noqa: E402

# The study's scale. ResNet-32 at width 1 (0.47 M parameters, 0.14 GFLOPs per image) on the 1,438 training
# images of digits: stage 1 reaches about 98.5% test accuracy in 30 epochs; an epoch takes about 12 s on one
# core of a quiet machine. Stage 3 differs from the seed's CIFAR-100 command (alpha 0.1, rl_weight 0.1,
# lr 0.001, 100 epochs) because it has 10 epochs (220 steps) instead of ~20,000 steps: at the seed's weights
# the switches do not move in that budget, so the policy loss gets weight 1 and lr 0.01, and alpha is swept.
SCALES = {
    "digits": dict(
        data="digits", resize=32, depth=32, width=1, bs=64, seeds=(0, 1, 2),
        sp=dict(epochs=30, lr=0.1),
        prune=dict(epochs=10, lr=0.01, fisher_batches=22),
        rl=dict(epochs=10, lr=0.01, gamma=1.0, rl_weight=1.0),
        main_compression=0.6, main_alpha=1.5, val_split=0.1,
        search=dict(budget=1.0, dynamic_trials=5, max_alpha=8.0),
        sweep_compressions=(0.4, 0.6, 0.75), sweep_alphas=(0.5, 1.0, 1.5, 2.0, 4.0, 8.0),
        peer_methods=("magnitude", "taylor"), latency_repeats=20),
    "quick": dict(
        data="synthetic", resize=16, depth=8, width=1, bs=32, seeds=(0,),
        sp=dict(epochs=1, lr=0.05),
        prune=dict(epochs=1, lr=0.01, fisher_batches=2),
        rl=dict(epochs=1, lr=0.01, gamma=1.0, rl_weight=1.0),
        main_compression=0.5, main_alpha=1.0, val_split=0.25,
        search=dict(budget=100.0, dynamic_trials=2, max_alpha=4.0),  # any network passes: the code path only
        sweep_compressions=(0.5,), sweep_alphas=(1.0, 4.0),
        peer_methods=("magnitude", "taylor"), latency_repeats=1),
}


# ------------------------------------------------------------------------------------ the commands

def sp_command(s, data_dir, run_dir, seed):
    return ["main_sp.py", "--network", "resnet", "--depth", str(s["depth"]), "--width", str(s["width"]),
            "--epochs", str(s["sp"]["epochs"]), "--lr", str(s["sp"]["lr"]), "--bs", str(s["bs"]),
            "--num_workers", "0", "--img_type", "png", "--resize", str(s["resize"]), "--seed", str(seed),
            "--device", "cpu", "--data_dir", data_dir, "--result_dir", run_dir, "--val_split", str(s["val_split"])]


def prune_config(s, data_dir, run_dir, seed, compression, checkpoint=None):
    return {"result_dir": run_dir, "data_dir": data_dir, "checkpoint": checkpoint, "num_workers": 0,
            "resize": s["resize"], "prune_mode": "one_pass", "compression": compression, "epochs": s["prune"]["epochs"],
            "lr": s["prune"]["lr"], "bs": s["bs"], "fisher_batches": s["prune"]["fisher_batches"], "seed": seed,
            "device": "cpu", "val_split": s["val_split"]}


def rl_command(s, data_dir, run_dir, seed, alpha, checkpoint=None):
    cmd = ["main_rl_prune.py", "--network", "resnet", "--depth", str(s["depth"]),
           "--epochs", str(s["rl"]["epochs"]), "--lr", str(s["rl"]["lr"]), "--bs", str(s["bs"]),
           "--num_workers", "0", "--img_type", "png", "--resize", str(s["resize"]), "--seed", str(seed),
           "--device", "cpu",
           "--data_dir", data_dir, "--result_dir", run_dir, "--alpha", str(alpha),
           "--gamma", str(s["rl"]["gamma"]), "--rl_weight", str(s["rl"]["rl_weight"]),
           "--val_split", str(s["val_split"])]
    return cmd + (["--checkpoint", checkpoint] if checkpoint else [])


def search_command(s, run_dir, config_path):
    """The table's networks, chosen by main_search.py on the validation split of the stage-1 run: stage 2 at
    the seed's compression (the seed fixes it; --min/--max_compression pin it), and the stage-3 setting
    bisected for the fewest GFLOPs within the budget (alpha where stage 3 has no --target_gflops)."""
    c, search = s["main_compression"], s["search"]
    return ["main_search.py", "--result_dir", run_dir, "--prune_config", config_path, "--device", "cpu",
            "--num_workers", "0", "--budget", str(search["budget"]), "--min_compression", str(c),
            "--max_compression", str(c), "--static_trials", "1", "--dynamic_trials", str(search["dynamic_trials"]),
            "--max_alpha", str(search["max_alpha"]), "--rl_epochs", str(s["rl"]["epochs"]),
            "--rl_lr", str(s["rl"]["lr"]), "--rl_bs", str(s["bs"]), "--rl_weight", str(s["rl"]["rl_weight"]),
            "--gamma", str(s["rl"]["gamma"])]


# ------------------------------------------------------------------------------------- the tasks

@dataclass
class Task:
    name: str
    argv: list                       # python script and its arguments, run from the repository root
    output: str                      # the file the task exists to write
    deps: list = field(default_factory=list)
    config: dict = None              # written to config_path before the run (stage 2's JSON config)
    config_path: str = None
    exclusive: bool = False          # runs alone (timings)
    seconds: float = None
    reused: bool = False


def plan(s, out):
    """Every task of the study with its dependencies."""
    data = os.path.join(out, "data")
    tasks = []
    for seed in s["seeds"]:
        run = os.path.join(out, f"seed{seed}")
        cfg_path = os.path.join(run, "prune_config.json")
        tasks += [
            Task(f"sp/seed{seed}", sp_command(s, data, run, seed), os.path.join(run, "sp", "metrics.json")),
            Task(f"prune/seed{seed}", ["main_prune.py", "--config_path", cfg_path],
                 os.path.join(run, "prune", "metrics.json"), [f"sp/seed{seed}"],
                 prune_config(s, data, run, seed, s["main_compression"]), cfg_path),
            Task(f"rl/seed{seed}", rl_command(s, data, run, seed, s["main_alpha"]),
                 os.path.join(run, "rl", "metrics.json"), [f"prune/seed{seed}"])]
        search_cfg = os.path.join(run, "search_prune_config.json")
        tasks.append(Task(f"search/seed{seed}", search_command(s, run, search_cfg),
                          os.path.join(run, "search", "table.json"), [f"sp/seed{seed}"],
                          prune_config(s, data, run, seed, s["main_compression"]), search_cfg))
    seed0 = s["seeds"][0]
    run0 = os.path.join(out, f"seed{seed0}")
    for c in s["sweep_compressions"]:
        if c == s["main_compression"]:
            prune_dir, prune_task = run0, f"prune/seed{seed0}"  # the main run is this sweep level
        else:
            prune_dir, prune_task = os.path.join(out, "sweep", f"c{c}"), f"prune/c{c}"
            cfg_path = os.path.join(prune_dir, "prune_config.json")
            tasks.append(Task(prune_task, ["main_prune.py", "--config_path", cfg_path],
                              os.path.join(prune_dir, "prune", "metrics.json"), [f"sp/seed{seed0}"],
                              prune_config(s, data, prune_dir, seed0, c,
                                           os.path.join(run0, "sp", "checkpoint.pt")), cfg_path))
        for a in s["sweep_alphas"]:
            if c == s["main_compression"] and a == s["main_alpha"]:
                continue  # seed 0's main stage 3
            rl_dir = os.path.join(out, "sweep", f"c{c}", f"a{a}")
            tasks.append(Task(f"rl/c{c}/a{a}", rl_command(
                s, data, rl_dir, seed0, a, os.path.join(prune_dir, "prune", "checkpoint.pt")),
                os.path.join(rl_dir, "rl", "metrics.json"), [prune_task]))
    tasks.sort(key=lambda t: not t.name.startswith("sp/"))  # the longest tasks first (stable otherwise)
    if peer_available():
        peer = "bench/peer_torch_pruning.py"
        for m in s["peer_methods"]:
            tasks.append(Task(f"peer/{m}", [peer, "finetune", "--result_dir", run0, "--method", m],
                              os.path.join(run0, "peer", m, "metrics.json"), [f"prune/seed{seed0}"]))
        tasks.append(Task("measure", [peer, "measure", "--result_dir", run0, "--threads", "2", "--repeats",
                                      str(s["latency_repeats"])], os.path.join(run0, "peer", "measure.json"),
                          [t.name for t in tasks], exclusive=True))
    return tasks


def peer_available():
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def stamp_path(task):
    return task.output + ".task.json"


def already_done(task):
    """The task's output exists and was written by this very command (and config). (A task whose
    dependencies ran again in this call runs again too: run_all passes upstream_rerun.)"""
    if not (os.path.isfile(task.output) and os.path.isfile(stamp_path(task))):
        return False
    with open(stamp_path(task)) as f:
        stamp = json.load(f)
    return stamp.get("argv") == task.argv and stamp.get("config") == task.config


def run_task(task, logs, threads, upstream_rerun):
    if already_done(task) and not upstream_rerun:
        with open(stamp_path(task)) as f:
            task.seconds, task.reused = json.load(f)["seconds"], True
        return task
    if task.config is not None:
        os.makedirs(os.path.dirname(task.config_path), exist_ok=True)
        with open(task.config_path, "w") as f:
            json.dump(task.config, f, indent=2)
    log_path = os.path.join(logs, task.name.replace("/", "_") + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, *task.argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    task.seconds = time.time() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"task {task.name} failed (exit {proc.returncode}); {log_path} ends with:\n{tail}")
    with open(stamp_path(task), "w") as f:
        json.dump({"argv": task.argv, "config": task.config, "seconds": task.seconds}, f)
    print(f"[study] {task.name} done in {task.seconds:.0f}s", flush=True)
    return task


def run_all(tasks, jobs, threads, logs):
    """Run the tasks, `jobs` at a time, each once its dependencies are done; exclusive ones alone."""
    os.makedirs(logs, exist_ok=True)
    pending, running, done, rerun = list(tasks), {}, set(), set()
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for task in list(pending):
                ready = all(d in done for d in task.deps)
                room = len(running) < jobs and not any(t.exclusive for t in running.values())
                if ready and room and (not task.exclusive or not running):
                    upstream = any(d in rerun for d in task.deps)
                    running[pool.submit(run_task, task, logs, threads, upstream)] = task
                    pending.remove(task)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                future.result()  # a failed task stops the study with its log's tail
                done.add(task.name)
                if not task.reused:
                    rerun.add(task.name)


# ----------------------------------------------------------------------------------- the results

def read_json(path):
    with open(path) as f:
        return json.load(f)


def mean_std(values):
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def study_table(s, out):
    """The headline table of every seed (each search's table.json: settings chosen on the validation split,
    each network evaluated once on test) and its mean and std over seeds."""
    per_seed = {seed: read_json(os.path.join(out, f"seed{seed}", "search", "table.json"))["rows"]
                for seed in s["seeds"]}
    rows = []
    for i, first in enumerate(per_seed[s["seeds"][0]]):
        seeds_rows = [per_seed[seed][i] for seed in s["seeds"]]
        base = [per_seed[seed][0]["accuracy"] for seed in s["seeds"]]
        rows.append({"method": first["method"], "stage": first["stage"],
                     **{k: mean_std([r[k] for r in seeds_rows]) for k in
                        ("accuracy", "gflops_per_image", "compression", "params")},
                     "accuracy_drop": mean_std([b - r["accuracy"] for b, r in zip(base, seeds_rows)])})
    return rows


def targets_met(rows):
    unpruned, static, dynamic = rows
    return {"dynamic_within_1_point": dynamic["accuracy_drop"]["mean"] <= 1.0,
            "compression_at_least_60": dynamic["compression"]["mean"] >= 0.6 - 1e-9,
            "dynamic_fewer_gflops_than_static":
                dynamic["gflops_per_image"]["mean"] < static["gflops_per_image"]["mean"]}


def sweep_points(s, out):
    """Every point of the picture, each with the metrics.json it comes from."""
    seed0 = s["seeds"][0]
    run0 = os.path.join(out, f"seed{seed0}")

    def point(kind, path, **extra):
        m = read_json(path)
        return {"kind": kind, "test_acc": m["test_acc"], "gflops_per_image": m["gflops_per_image"],
                "params": m["params"], "source": os.path.relpath(path, ROOT), **extra}

    points = [point("unpruned", os.path.join(run0, "sp", "metrics.json"), compression=0.0)]
    for c in s["sweep_compressions"]:
        prune_dir = run0 if c == s["main_compression"] else os.path.join(out, "sweep", f"c{c}")
        points.append(point("static", os.path.join(prune_dir, "prune", "metrics.json"), compression_target=c,
                            compression=read_json(os.path.join(prune_dir, "prune", "metrics.json"))["compression"]))
        for a in s["sweep_alphas"]:
            rl_dir = run0 if c == s["main_compression"] and a == s["main_alpha"] else \
                os.path.join(out, "sweep", f"c{c}", f"a{a}")
            rl_metrics = os.path.join(rl_dir, "rl", "metrics.json")
            points.append(point("static+dynamic", rl_metrics, compression_target=c, alpha=a,
                                compression=read_json(rl_metrics)["compression"]))
    for m in s["peer_methods"]:
        path = os.path.join(run0, "peer", m, "metrics.json")
        if os.path.isfile(path):
            points.append(point(f"torch-pruning {m}", path, compression=read_json(path)["compression"]))
    return points


def comparison(s, out):
    path = os.path.join(out, f"seed{s['seeds'][0]}", "peer", "measure.json")
    return read_json(path) if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------- Markdown

def pm(stat, scale=1.0, digits=2):
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def chosen_settings(s, out):
    """{seed: the static + dynamic row's settings found by the search}."""
    return {seed: read_json(os.path.join(out, f"seed{seed}", "search", "table.json"))["rows"][2].get("settings") or {}
            for seed in s["seeds"]}


def markdown(s, rows, met, peer, points, timing, command, out):
    n = len(s["seeds"])
    data = "Digits (scikit-learn, 1,797 images, 32x32 PNG)" if s["data"] == "digits" else \
        f"Synthetic images ({s['resize']}x{s['resize']} PNG)"
    lines = [f"{data}, ResNet-{s['depth']} width {s['width']}, "
             f"{n} seed{'s' * (n > 1)} (mean ± sample std). Reproduce: `{command}`.", "",
             "| Method | Accuracy (%) | Drop vs unpruned (points) | GFLOPs / image | Compression |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {pm(r['accuracy'])} | {pm(r['accuracy_drop'])} | "
                     f"{pm(r['gflops_per_image'], digits=4)} | {pm(r['compression'], 100, 1)}% |")
    seeds = "/".join(map(str, s["seeds"]))
    lines += ["", "Static + dynamic setting chosen per seed by main_search.py on the validation split of the "
              f"stage-1 run (budget {s['search']['budget']:g} point; test read once per chosen network): " + "; ".join(
                  f"seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in settings.items())
                  for seed, settings in chosen_settings(s, out).items()) + "."]
    lines += ["", f"Per seed ({seeds}): " + "; ".join(
        f"{r['method']} {'/'.join(f'{v:.2f}' for v in r['accuracy']['values'])}% at "
        f"{'/'.join(f'{v:.4f}' for v in r['gflops_per_image']['values'])} GFLOPs" for r in rows) + ".",
        "", "Targets (on the means): " + ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'NO'}"
                                                   for k, v in met.items()), ""]
    if peer:
        m = peer["models"]
        epochs = peer["finetune_budget"]["epochs"]
        lines += [f"Torch-Pruning on the same stage-1 network (seed {s['seeds'][0]}), pruned to our stage-2 "
                  f"parameter count, fine-tuned {epochs} epochs like our stage 2; latency on CPU with "
                  f"{peer['threads']} threads (median of {peer['repeats']}).", "",
                  "| Method | Params | Acc. after pruning (%) | Acc. after fine-tuning (%) | GFLOPs / image | "
                  "Latency b128 (ms) | Latency b1 (ms) |", "|---|---|---|---|---|---|---|"]
        for key in ("unpruned", "ours_static", "ours_dynamic", "tp_magnitude", "tp_taylor"):
            if key not in m:
                continue
            r = m[key]
            before = "-" if r.get("test_acc_after_prune") is None else f"{r['test_acc_after_prune']:.2f}"
            lines.append(f"| {r['label']} | {r['params']:,} | {before} | {r['test_acc']:.2f} | "
                         f"{r['gflops_per_image']:.4f} | {r['latency_ms_b128']:.1f} | {r['latency_ms_b1']:.2f} |")
        lines += ["", f"Stage 3 adds {s['rl']['epochs']} REINFORCE epochs to the stage-2 model (alpha "
                      f"{s['main_alpha']}).", ""]
    lines += ["![accuracy vs GFLOPs](study.png)", "",
              f"Picture: {len(points)} runs (bench/results/study_points.json).", "", timing_line(timing)]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main

def record_timing(s, tasks, wall, out, jobs):
    """This call's wall time, and the study's from scratch: measured by the last call that reused no task
    (kept in <out>/full_run.json), valid while the scale is the same."""
    path = os.path.join(out, "full_run.json")
    if not any(t.reused for t in tasks):
        with open(path, "w") as f:
            json.dump({"wall_seconds": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "load_average_1_5_15_min": os.getloadavg(), "scale": s}, f, indent=2)
    full = read_json(path) if os.path.isfile(path) else None
    return {"this_call_seconds": wall, "task_seconds_total": sum(t.seconds for t in tasks), "jobs": jobs,
            "search_seconds": {t.name: t.seconds for t in tasks if t.name.startswith("search/")},
            "from_scratch": full if full and full["scale"] == json.loads(json.dumps(s)) else None}


def timing_line(timing):
    searches = timing["search_seconds"]
    minutes = " / ".join(f"{v / 60:.1f}" for v in searches.values())
    seeds = ", ".join(k.split("/")[1] for k in searches)
    line = f"The searches (main_search.py, one process each) took {minutes} min wall time ({seeds}). "
    return (line if searches else "") + _full_line(timing)


def _full_line(timing):
    full = timing["from_scratch"]
    if full:
        return (f"Wall time of the whole study from scratch: {full['wall_seconds'] / 60:.1f} min on 2 CPU cores "
                f"({timing['jobs']} jobs at once; finished {full['finished']}).")
    return (f"Wall time from scratch not measured for these settings; the tasks took "
            f"{timing['task_seconds_total'] / 60:.1f} job-minutes ({timing['jobs']} jobs at once).")


def shown(path):
    """A path as the commands name it: relative to the repository root when inside it."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def prepare_data(s, out):
    path = os.path.join(out, "data")
    if not os.path.isdir(path):
        if s["data"] == "digits":
            write_digits(path, size=32)
        else:
            write_synthetic(path, num_classes=4, train_per_class=16, test_per_class=8, size=s["resize"])
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny synthetic scale: the smoke test's")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "study"), help="runs and logs")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="summary files")
    p.add_argument("--jobs", type=int, default=2, help="tasks run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--remeasure", action="store_true", help="redo the latency measurement (a quieter machine)")
    args = p.parse_args(argv)
    s = dict(SCALES["quick" if args.quick else "digits"])
    if args.seeds:
        s["seeds"] = tuple(args.seeds)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    prepare_data(s, out)
    tasks = plan(s, shown(out))
    if args.remeasure:
        for t in tasks:
            if t.name == "measure" and os.path.isfile(stamp_path(t)):
                os.remove(stamp_path(t))
    run_all(tasks, args.jobs, args.threads, os.path.join(out, "logs"))
    wall = time.time() - t0
    timing = record_timing(s, tasks, wall, out, args.jobs)

    rows = study_table(s, out)
    met = targets_met(rows)
    points = sweep_points(s, shown(out))
    peer = comparison(s, out)
    command = "python bench/study.py" + (" --quick" if args.quick else "") + \
        (f" --seeds {' '.join(map(str, s['seeds']))}" if args.seeds else "")
    os.makedirs(args.results, exist_ok=True)
    summary = {"command": command, "scale": s, "wall_seconds": wall, "timing": timing,
               "task_seconds": {t.name: t.seconds for t in tasks}, "tasks_reused": [t.name for t in tasks if t.reused],
               "table": rows, "targets_met": met, "comparison": peer, "search_settings": chosen_settings(s, out),
               "commands": {t.name: ["python", *map(shown, t.argv)] for t in tasks},
               "stage2_configs": {t.name: t.config for t in tasks if t.config is not None}}
    with open(os.path.join(args.results, "study.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.results, "study_points.json"), "w") as f:
        json.dump({"x": "gflops_per_image", "y": "test_acc", "points": points}, f, indent=2)
    try:
        from bench.plot import plot_points
        plot_points(points, os.path.join(args.results, "study.png"))
    except ImportError:
        print("[study] matplotlib missing: no study.png (pip install -r bench/requirements.txt)", flush=True)
    with open(os.path.join(args.results, "study.md"), "w") as f:
        f.write(markdown(s, rows, met, peer, points, timing, command, out))
    print(open(os.path.join(args.results, "study.md")).read(), end="")
    print(f"[study] {wall / 60:.1f} min -> {args.results}/study.{{json,md,png}}, study_points.json", flush=True)
    return summary


if __name__ == "__main__":
    main()
