"""Runs the project's scripts as a user runs them: one script (run_script), or a set of tasks with
dependencies, several at a time, each reused while its output and stamp say it was done by the same command
(Task, run_all). The study, the cross-fitting and the controllers' comparisons plan their tasks; the
benchmarks and the tests run the scripts through run_script too."""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(argv, env=None, **kwargs):
    """`python *argv` from the repository root (a script's path, or -m and a module), `env` added to this
    process's environment; the other keyword arguments are subprocess.run's. Returns the CompletedProcess."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, **(env or {})}, **kwargs)


@dataclass
class Task:
    name: str
    argv: object                     # python script and its arguments, run from the repository root; or a
    output: str                      # function returning them, called once the dependencies are done
    deps: list = field(default_factory=list)
    config: object = None            # written to config_path before the run (stage 2's JSON config); or a function
    config_path: str = None
    seconds: float = None
    reused: bool = False

    def resolve(self):
        self.argv = self.argv() if callable(self.argv) else self.argv
        self.config = self.config() if callable(self.config) else self.config


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
    task.resolve()
    if already_done(task) and not upstream_rerun:
        with open(stamp_path(task)) as f:
            task.seconds, task.reused = json.load(f)["seconds"], True
        return task
    if task.config is not None:
        os.makedirs(os.path.dirname(task.config_path), exist_ok=True)
        with open(task.config_path, "w") as f:
            json.dump(task.config, f, indent=2)
    log_path = os.path.join(logs, task.name.replace("/", "_") + ".log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = run_script(task.argv, env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
                          stdout=log, stderr=subprocess.STDOUT)
    task.seconds = time.time() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"task {task.name} failed (exit {proc.returncode}); {log_path} ends with:\n{tail}")
    with open(stamp_path(task), "w") as f:
        json.dump({"argv": task.argv, "config": task.config, "seconds": task.seconds}, f)
    print(f"[run] {task.name} done in {task.seconds:.0f}s", flush=True)
    return task


def run_all(tasks, jobs, threads, logs):
    """Run the tasks, `jobs` at a time, each once its dependencies are done, in the order given. A failed
    task skips the tasks that depend on it, not the others; RuntimeError at the end names the failures."""
    os.makedirs(logs, exist_ok=True)
    pending, running, done, rerun, failed = list(tasks), {}, set(), set(), {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for task in list(pending):
                if any(d in failed for d in task.deps):
                    failed[task.name] = "skipped: a dependency failed"
                    pending.remove(task)
                elif all(d in done for d in task.deps) and len(running) < jobs:
                    upstream = any(d in rerun for d in task.deps)
                    running[pool.submit(run_task, task, logs, threads, upstream)] = task
                    pending.remove(task)
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001 -- reported with the task's log, the study goes on
                    failed[task.name] = str(e)
                    print(f"[run] {e}", flush=True)
                    continue
                done.add(task.name)
                if not task.reused:
                    rerun.add(task.name)
    if failed:
        raise RuntimeError("failed: " + "; ".join(f"{k} ({v.splitlines()[0]})" for k, v in failed.items()))
