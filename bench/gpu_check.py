"""The first command to run on a GPU machine (bench/gpu_check.sh is the same): checks that the three stages
train, resume, reload and export there, and measures what a GPU changes, in a few minutes, into one JSON.

    bash bench/gpu_check.sh [--quick] [--device cuda|cuda:N|cpu] [--out PATH] [--steps N] [--tiny]
                            [--no_compile] [--keep]

Without a usable CUDA GPU it says why in one line and exits 1, unless --device cpu is given. The JSON goes to
results/gpu_check[_quick][_tiny][_cpu].json (--out): a quick, tiny or CPU run never writes over another kind's
record. --quick: the same parts at 2,000 training images and 64 steps per stage, without the compiled runs
(minutes of compiling): under 5 minutes on one H100-class GPU by the estimate of its parts (estimate() below,
recorded in the JSON beside each part's measured seconds).

On synthetic CIFAR-shaped data (utils/synthetic.py, PNG class folders: 100 classes, 32x32, 4,000 training
images; --tiny: 4 classes at 16x16, 32 images), with ResNet-32 at width 4 (--tiny: ResNet-8 at width 1),
at the stages' own defaults for the device (bf16 autocast + channels_last on CUDA, TF32 off), every part
records its result or its error in the JSON, each under "parts":

  data             the dataset written
  stage1..stage3   main_sp.py, main_prune.py, main_rl_prune.py run as a user runs them (subprocesses):
                   exit status, the epochs they ran, their losses, metrics.json (its precision and the
                   stage's peak memory among them); stage 3 with its default controller (counterfactual)
  stage1_resume    stage 1's folder copied and run again under torchrun (one process) with --resume and more
                   epochs: it continues at the next epoch, in the same run (run id, TensorBoard folder), and
                   ends at the new count
  finite_losses    every printed training / evaluation loss and every final test loss is finite
  torchrun         the three stages under torchrun with 2 processes (DistributedDataParallel): NCCL where 2 GPUs
                   exist, gloo on the CPU; with one GPU it is untested, and said so (status skipped)
  reload           runtime.checkpoint.load_model of each stage's checkpoint on the CPU and on the device, fp32
                   on both with TF32 off: the switch decisions that differ are counted and at most
                   FLIP_TOLERANCE of them may (a decision near the threshold can fall either way under another
                   order of float sums), top-1 may differ only on images whose route differs or within that
                   tolerance; a second CPU load must agree exactly
  export           python -m deploy.export on stage 3's checkpoint (its own checks: ONNX, torch.export)
  throughput       training images/s and peak memory of each stage's own step function beside a minimal dense
                   loop (plain ResNet in mode open, SGD), in this process on the same batch: stage 3's default
                   controller (counterfactual, its default blocks flipped per step) and REINFORCE
  tf32             (CUDA) stage 1's step at --amp off with TF32 off and on: whether --tf32 is worth allowing
  script_throughput  each stage's images/s as its script ran it (TensorBoard's epoch_seconds of its last
                   epoch: training + that epoch's evaluation)
  compile          each stage's script run again with its --compile for 2 epochs: the second epoch's images/s
                   against the eager run's last, the graphs compiled, recompilations and whether CUDA graphs
                   ran (metrics.json's "compile"); skipped with --quick and --no_compile; --tiny compiles stage 3
                   alone (aot_eager on the CPU: the path, not a speed)
  profile          per training step: CUDA kernels (torch.profiler) and host syncs
                   (torch.cuda.set_sync_debug_mode("warn")), with the lines that sync; on the CPU, ATen ops
                   dispatched per step (no sync counting)
  cudnn_benchmark  first vs second evaluation pass with torch.backends.cudnn.benchmark off and on, for the
                   routed network (sub-batches of varying size) and the dense one (CUDA only; fresh
                   processes, since cuDNN's plan cache outlives the flag)

The header records the precision flags (TF32, cudnn.benchmark, amp, channels_last). Each part's "status" is
ok, failed, skipped (does not apply here, or untested: its "why" says which) or not_run (a part it needs
failed); the exit status is 1 if any part failed or did not run. The JSON is rewritten after every part, so
a run that is killed leaves what it had.
"""
import argparse
import collections
import contextlib
import glob
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # before torch: above USDT (5), which logs every profiler start and stop
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from evaluation.runner import run_script  # noqa: E402
from utils.files import read_json  # noqa: E402
from utils.synthetic import write_synthetic  # noqa: E402

# --tiny: a smoke test that its test runs in under a minute on 2 CPU cores
SIZES = {
    "full": dict(classes=100, train_per_class=40, test_per_class=10, size=32, depth=32, width=4, bs=128,
                 num_workers=4, fisher_batches=8, steps=256, timed_steps=50, warmup=5, profile_steps=5),
    "quick": dict(classes=100, train_per_class=20, test_per_class=10, size=32, depth=32, width=4, bs=128,
                  num_workers=4, fisher_batches=4, steps=64, timed_steps=20, warmup=3, profile_steps=3),
    "tiny": dict(classes=4, train_per_class=8, test_per_class=4, size=16, depth=8, width=1, bs=8,
                 num_workers=0, fisher_batches=2, steps=4, timed_steps=2, warmup=1, profile_steps=1),
}
# The reload test's tolerance: the share of switch decisions (images x switches) that may differ between the
# CPU and the GPU (fp32 both, TF32 off; at least one): a p within float rounding of 0.5 goes either way
FLIP_TOLERANCE = 0.001

# Seconds each part is expected to take on one H100-class GPU with 16 CPU cores, by assumption, not
# measurement (no GPU ran this project before): a process start (python, torch, CUDA context) 8 s; a step
# of ResNet-32 k=4 at bs 128 under bf16 bound by kernel launches (~1,500 per dense step at ~5 us): dense
# 10 ms, stage 1's joint step 20 ms, stage 3's counterfactual 25 ms (4 blocks flipped; 40 ms all), an
# evaluation pass over the test images 0.5 s; stage 2's factor pass and eigendecompositions 15 s; the
# export on the CPU 60 s (beside the rest); inductor's compile of a stage's step 90 s; a cuDNN probe 12 s.
# Each part's measured seconds are recorded beside it: the first GPU run replaces these guesses.
STARTUP, EVAL_PASS, COMPILE, PROBE = 8.0, 0.5, 90.0, 12.0
STEP_SECONDS = {"sp": 0.020, "prune": 0.010, "rl": 0.025}
SUMMARY = re.compile(r"^\[(sp|prune|rl)\] epoch (\d+)/(\d+)\s+train loss (\S+) .*?\| eval .*? loss (\S+)")
OK, FAILED, SKIPPED, NOT_RUN = "ok", "failed", "skipped", "not_run"
COMPILE_TIMEOUT = 300  # seconds per compiled stage run: longer is a finding, recorded as a timeout


# ------------------------------------------------------------------------------------------ the record

class Report:
    """Parts in the order they finish, written to `path` after each (parts may run in threads)."""

    def __init__(self, path, header):
        self.path, self.data = path, {**header, "parts": {}}
        self.lock = threading.Lock()
        self.write()

    def status(self, name):
        return self.data["parts"].get(name, {}).get("status")

    def part(self, name, fn, needs=()):
        """Run fn() -> dict; its "checks" (name -> bool) decide ok / failed, an exception is a failure
        with its message; a part whose `needs` did not pass is not run."""
        missing = [n for n in needs if self.status(n) not in (OK, SKIPPED)]
        t0 = time.perf_counter()
        if missing:
            result = {"status": NOT_RUN, "why": f"needs {', '.join(missing)}, which did not pass"}
        else:
            try:
                result = fn() or {}
                checks = result.get("checks", {})
                bad = [k for k, v in checks.items() if v is not True]
                result.setdefault("status", FAILED if bad else OK)
                if bad:
                    result["failed_checks"] = bad
            except Exception as e:  # one part failing must not hide the others
                result = {"status": FAILED, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        with self.lock:
            self.data["parts"][name] = result
            self.write()
        return result

    def write(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, self.path)


def in_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------------------ running the real scripts

def run_cmd(argv, env, timeout):
    """`python *argv` as a user runs it, from the repository root; its output is kept for parsing."""
    t0 = time.perf_counter()
    out = {"cmd": shlex.join(["python", *argv])}
    try:
        p = run_script(argv, env=env, capture_output=True, text=True, timeout=timeout)
        out.update(rc=p.returncode, stdout=p.stdout, stderr=p.stderr)
    except subprocess.TimeoutExpired as e:
        out.update(rc=None, timed_out=timeout, stdout=_text(e.stdout), stderr=_text(e.stderr))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _text(b):
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def public(proc, ok):
    """What of a command goes into the JSON: all but its full output (the tail of it when it failed)."""
    rec = {k: v for k, v in proc.items() if k not in ("stdout", "stderr")}
    lines = [ln for ln in proc["stdout"].splitlines() if ln.strip()]
    rec["stdout_tail"] = lines[-3:] if ok else lines[-15:]
    if not ok:
        rec["stderr_tail"] = proc["stderr"][-3000:]
    return rec


def parse_losses(stdout, stage):
    """(epoch, train loss, eval loss) of every one-line epoch summary the stage printed."""
    out = []
    for line in stdout.splitlines():
        m = SUMMARY.match(line.strip())
        if m and m.group(1) == stage:
            out.append((int(m.group(2)), float(m.group(4)), float(m.group(5))))
    return out


def stage_record(proc, stage, result_dir, epochs):
    """A stage run: its command, the losses it printed, its metrics.json; checks that it ran its epochs
    with finite losses and wrote finite final numbers."""
    losses = parse_losses(proc["stdout"], stage)
    metrics_path = os.path.join(result_dir, stage, "metrics.json")
    metrics = read_json(metrics_path) if proc["rc"] == 0 and os.path.isfile(metrics_path) else {}
    final_loss = metrics.get(f"{metrics.get('final_split', 'test')}_loss")
    checks = {
        "exit_status_0": proc["rc"] == 0,
        "epochs_run": [e for e, _, _ in losses] == list(epochs),
        "losses_finite": bool(losses) and all(math.isfinite(v) for _, a, b in losses for v in (a, b)),
        "final_loss_finite": isinstance(final_loss, (int, float)) and math.isfinite(final_loss),
    }
    rec = public(proc, all(checks.values()))
    rec.update(checks=checks, losses=[{"epoch": e, "train_loss": a, "eval_loss": b} for e, a, b in losses],
               final_loss=final_loss, **{k: metrics[k] for k in ("test_acc", "routed_acc", "gflops_per_image",
                                                                   "params", "run_id", "precision", "peak_memory",
                                                                   "compile", "controller") if k in metrics})
    return rec


def epoch_seconds(stage_dir, stage):
    """epoch -> seconds of each epoch (training + its evaluation) from the stage's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for run in sorted(glob.glob(os.path.join(stage_dir, "tb", "*"))):
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        tag = f"{stage}/train/epoch_seconds"
        if tag in acc.Tags().get("scalars", []):
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


# ------------------------------------------------------------------------------------ the check itself

def epochs(s, tiny=False):
    """Epochs of each stage run for sizes `s`: a few hundred steps (s["steps"]) rounded to whole epochs; stage 1
    runs half of them, then its --resume the rest."""
    train_images = s["classes"] * s["train_per_class"]
    steps_per_epoch = -(-train_images // s["bs"])
    n = max(2, round(s["steps"] / steps_per_epoch))
    return {"train_images": train_images, "steps_per_epoch": steps_per_epoch, "sp": (max(1, n // 2), n),
            "prune": max(1, n // 2), "rl": max(1, n // 2) if tiny else n}


def estimate(s, tiny=False, compiled=True, gpus=1):
    """Seconds each part would take on one H100-class GPU (the assumptions above STEP_SECONDS) for sizes `s`, and
    their sum on the critical path (the export runs beside the other parts)."""
    e = epochs(s, tiny)
    steps = e["steps_per_epoch"]
    stage = lambda name, n: STARTUP + n * steps * STEP_SECONDS[name] + (n + 2) * EVAL_PASS  # noqa: E731
    est = {"data": e["train_images"] / 1000 + 2, "stage1": stage("sp", e["sp"][0]),
           "stage1_resume": STARTUP + stage("sp", e["sp"][1] - e["sp"][0]),  # torchrun's own start too
           "stage2": stage("prune", e["prune"]) + 15, "stage3": stage("rl", e["rl"]) + 5,  # + calibration, BN
           "throughput": 5 * (s["timed_steps"] + s["warmup"]) * 0.03 + 10, "tf32": 4 * (s["timed_steps"] + s["warmup"])
           * 0.03, "profile": 5 * (2 + 2 * s["profile_steps"]) * 0.05 + 10, "cudnn_benchmark": 4 * PROBE,
           "export": 60.0, "reload": 3 * 4 + 5, "torchrun": 3 * 2 * STARTUP + 30 if gpus >= 2 else 0.0,
           "compile": (3 + (gpus >= 2)) * (COMPILE + STARTUP + 2 * EVAL_PASS) if compiled else 0.0,
           "script_throughput": 1.0, "finite_losses": 0.0}
    est = {k: round(v, 1) for k, v in est.items()}
    return {"parts": est, "total": round(sum(v for k, v in est.items() if k != "export"), 1),
            "assumptions": "bench/gpu_check.py: STARTUP, STEP_SECONDS, EVAL_PASS, COMPILE, PROBE (guesses until a "
                           "GPU has run it: each part's measured seconds are beside it)"}


class Check:
    def __init__(self, args):
        self.args = args
        self.size = dict(SIZES["tiny" if args.tiny else "quick" if args.quick else "full"])
        if args.steps:
            self.size["steps"] = args.steps
        s = self.size
        self.cuda = args.device.startswith("cuda")
        self.work = tempfile.mkdtemp(prefix="dynprune-gpu-check-")
        self.data = os.path.join(self.work, "data")
        self.results = os.path.join(self.work, "results")
        self.resumed = os.path.join(self.work, "resumed")
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "PYTHONUNBUFFERED": "1"}
        self.timeout = 180 if args.tiny else 600
        e = epochs(s, args.tiny)
        self.train_images, steps_per_epoch = e["train_images"], e["steps_per_epoch"]
        self.sp_epochs, self.prune_epochs, self.rl_epochs = e["sp"], e["prune"], e["rl"]
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.ctx = None
        self._models = None
        header = {
            "what": "bench/gpu_check.py", "argv": sys.argv[1:], "tiny": args.tiny, "quick": args.quick,
            "device": args.device,
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": self.gpus,
            "gpu_name": torch.cuda.get_device_name(torch.device(args.device)) if self.cuda else None,
            "cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "numerics": "the stages' defaults: bf16 autocast + channels_last on CUDA, fp32 NCHW on the CPU; TF32 "
                        "off (--tf32 not given)",
            "precision_flags": self.precision_flags(),
            "sizes": {**s, "train_images": self.train_images, "test_images": s["classes"] * s["test_per_class"],
                      "steps_per_epoch": steps_per_epoch, "stage1_epochs": list(self.sp_epochs),
                      "stage2_epochs": self.prune_epochs, "stage3_epochs": self.rl_epochs},
        }
        header["estimate_h100_seconds"] = estimate(s, args.tiny, compiled=not (args.quick or args.no_compile),
                                                   gpus=self.gpus if self.cuda else 1)
        self.report = Report(args.out, header)

    def precision_flags(self):
        """The float32 flags as the stages set them (utils.dist.setup, TF32 off by default), and the stages'
        numerics on this device."""
        from utils.dist import tf32_flags
        ctx = self.context()
        return {**tf32_flags(), "cudnn_benchmark": torch.backends.cudnn.benchmark, "amp": "bf16" if ctx.amp else "off",
                "channels_last": ctx.channels_last, "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "set_by": "utils.dist.set_tf32 (the legacy flags only)"}

    # ---- commands
    def common(self, device=None):
        s = self.size
        return ["--data_dir", self.data, "--img_type", "png", "--resize", str(s["size"]), "--num_workers",
                str(s["num_workers"]), "--device", device or self.args.device, "--bs", str(s["bs"])]

    def sp_cmd(self, result_dir, epochs, device=None):
        s = self.size
        return ["main_sp.py", *self.common(device), "--depth", str(s["depth"]), "--width", str(s["width"]),
                "--epochs", str(epochs), "--lr", "0.1", "--result_dir", result_dir]

    def prune_cmd(self, result_dir, epochs, device=None):
        s = self.size
        sets = {"epochs": epochs, "bs": s["bs"], "num_workers": s["num_workers"],
                "fisher_batches": s["fisher_batches"], "img_type": "png"}
        return ["main_prune.py", "--config_path", "config.json", "--result_dir", result_dir, "--data_dir",
                self.data, "--device", device or self.args.device,
                *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]

    def rl_cmd(self, result_dir, epochs, device=None, checkpoint=None):
        return ["main_rl_prune.py", *self.common(device), "--epochs", str(epochs), "--result_dir", result_dir,
                *(["--checkpoint", checkpoint] if checkpoint else [])]

    def python(self, argv, timeout=None):
        return run_cmd(argv, self.env, timeout or self.timeout)

    def ckpt(self, stage, result_dir=None):
        return os.path.join(result_dir or self.results, stage, "checkpoint.pt")

    # ---- parts
    def part_data(self):
        s = self.size
        write_synthetic(self.data, layout="png", num_classes=s["classes"], train_per_class=s["train_per_class"],
                        test_per_class=s["test_per_class"], size=s["size"], seed=0)
        n = {split: len(glob.glob(os.path.join(self.data, split, "*", "*.png"))) for split in ("train", "test")}
        return {"dir": self.data, "images": n, "classes": s["classes"], "size": s["size"],
                "checks": {"written": n["train"] == self.train_images and n["test"] > 0}}

    def torchrun(self, nproc):
        return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]

    def part_stage1(self):
        proc = self.python(self.sp_cmd(self.results, self.sp_epochs[0]))
        return stage_record(proc, "sp", self.results, range(1, self.sp_epochs[0] + 1))

    def part_stage1_resume(self):
        """Stage 1's folder copied (stage 2 reads the original meanwhile), then resumed for more epochs, under
        torchrun with one process (off the chain's critical path: torchrun's own start-up costs seconds)."""
        from runtime.checkpoint import load_checkpoint
        first, total = self.sp_epochs
        shutil.copytree(os.path.join(self.results, "sp"), os.path.join(self.resumed, "sp"))
        proc = self.python(self.torchrun(1) + self.sp_cmd(self.resumed, total) + ["--resume"])
        rec = stage_record(proc, "sp", self.resumed, range(first + 1, total + 1))
        ckpt = load_checkpoint(self.ckpt("sp", self.resumed), ("sp",)) if proc["rc"] == 0 else {}
        before = self.report.data["parts"]["stage1"].get("run_id")
        runs = glob.glob(os.path.join(self.resumed, "sp", "tb", "*"))
        rec["checks"].update(
            checkpoint_epoch=ckpt.get("epoch") == total,
            same_run=rec.get("run_id") is not None and rec.get("run_id") == before,
            one_tensorboard_run=len(runs) == 1)
        rec.update(first_run_epochs=first, resumed_to=total, checkpoint_epoch=ckpt.get("epoch"))
        return rec

    def part_stage2(self):
        proc = self.python(self.prune_cmd(self.results, self.prune_epochs))
        return stage_record(proc, "prune", self.results, range(1, self.prune_epochs + 1))

    def part_stage3(self):
        proc = self.python(self.rl_cmd(self.results, self.rl_epochs))
        rec = stage_record(proc, "rl", self.results, range(1, self.rl_epochs + 1))
        rec["checks"]["table_written"] = os.path.isfile(os.path.join(self.results, "table.json"))
        return rec

    def part_finite_losses(self):
        runs = {name: self.report.data["parts"].get(name, {}) for name in
                ("stage1", "stage1_resume", "stage2", "stage3")}
        for n, rec in self.report.data["parts"].get("torchrun", {}).get("runs", {}).items():
            if isinstance(rec, dict):
                runs[f"torchrun {n}"] = rec
        per = {name: {"train": [r["train_loss"] for r in rec.get("losses", [])],
                      "eval": [r["eval_loss"] for r in rec.get("losses", [])], "final": rec.get("final_loss")}
               for name, rec in runs.items()}
        checks = {name: bool(v["train"]) and all(math.isfinite(x) for x in v["train"] + v["eval"])
                  and isinstance(v["final"], (int, float)) and math.isfinite(v["final"]) for name, v in per.items()}
        return {"losses": per, "checks": checks}

    def part_torchrun(self):
        """The three stages under torchrun with 2 processes: on 2 GPUs (NCCL), or on the CPU (gloo: the code
        path, not the GPU's); with one GPU DistributedDataParallel is untested, and the part says so."""
        runs = {"1proc sp": "stage1_resume (stage 1's resumed run, under torchrun --nproc_per_node=1)"}
        if not self.ddp_possible():
            return {"status": SKIPPED, "runs": runs,
                    "why": f"untested: DistributedDataParallel with 2 processes needs 2 GPUs, {self.gpus} visible "
                           f"(the 1-process torchrun of stage1_resume is no DDP)"}
        rdir = os.path.join(self.work, "torchrun2")
        device = "cuda" if self.cuda else "cpu"  # several processes per machine take cuda:LOCAL_RANK
        checks = {}
        for stage, cmd, epochs in (("sp", self.sp_cmd(rdir, self.sp_epochs[0], device), self.sp_epochs[0]),
                                   ("prune", self.prune_cmd(rdir, 1, device), 1),
                                   ("rl", self.rl_cmd(rdir, 1, device), 1)):
            proc = self.python(self.torchrun(2) + cmd)
            rec = stage_record(proc, stage, rdir, range(1, epochs + 1))
            bs = self.size["bs"]
            rec["checks"]["global_batch_said"] = f"batch {bs} per step in all ({bs // 2} per process)" in proc["stdout"]
            runs[f"2proc {stage}"] = rec
            checks[f"2proc {stage}"] = all(rec["checks"].values())
            if not checks[f"2proc {stage}"]:
                break
        return {"runs": runs, "checks": checks, "backend": "nccl" if self.cuda else "gloo",
                "note": f"--bs {self.size['bs']} is the batch of a step over both processes ({self.size['bs'] // 2} "
                        f"each)"}

    def part_export(self):
        out = os.path.join(self.work, "export")
        proc = self.python(["-m", "deploy.export", self.ckpt("rl"), "--out", out])
        info = read_json(os.path.join(out, "export.json")) if proc["rc"] == 0 else {}
        check = info.get("check", {})
        files = {k: os.path.getsize(v) for k, v in info.get("files", {}).items() if os.path.isfile(v)}
        rec = public(proc, proc["rc"] == 0)
        rec.update(files_bytes=files, check=check, checks={
            "exit_status_0": proc["rc"] == 0,
            "files_written": bool(files) and len(files) == len(info.get("files", {})),
            "outputs_match": bool(check) and all(c.get("routes_equal") is True and
                                                 c.get("max_relative_diff", 1) <= 1e-4 for c in check.values())})
        return rec

    # ---- in this process
    def context(self):
        if self.ctx is None:
            from utils.dist import setup
            self.ctx = setup(self.args.device, seed=0)  # as the stages set up: amp, channels_last, cudnn
        return self.ctx

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.ctx.device)

    def test_images(self):
        paths, labels = [], []
        for d in sorted(glob.glob(os.path.join(self.data, "test", "*"))):
            for p in sorted(glob.glob(os.path.join(d, "*.png"))):
                paths.append(p)
                labels.append(os.path.basename(d))
        return paths, labels

    def part_reload(self):
        from runtime.checkpoint import load_model
        from runtime.predict import file_batches, predict
        from utils.dist import exact_fp32
        paths, names = self.test_images()
        out, checks = {}, {}
        with exact_fp32():
            for stage in ("sp", "prune", "rl"):
                path = self.ckpt(stage)
                cpu, pre = load_model(path, "cpu", mode="hard")  # the switches' routes, to compare them
                batches = list(file_batches(pre, paths, names, self.size["bs"]))
                a = predict(cpu, batches)
                # CUDA: the device against the CPU; CPU only: a second load, which must be identical
                other = load_model(path, self.args.device, mode="hard")[0]
                b = predict(other, [(x.to(self.args.device), y.to(self.args.device)) for x, y in batches])
                acc = [100.0 * r.correct.float().mean().item() for r in (a, b)]
                decisions = a.routes.numel()
                flips = int((a.routes != b.routes).sum().item())
                other_route = (a.routes != b.routes).any(1)
                top1 = a.logits.argmax(1) != b.logits.argmax(1)
                allowed = max(1, math.ceil(FLIP_TOLERANCE * decisions)) if self.cuda else 0
                allowed_top1 = max(1, math.ceil(FLIP_TOLERANCE * len(paths))) if self.cuda else 0
                metrics = read_json(os.path.join(self.results, stage, "metrics.json"))
                out[stage] = {"cpu_acc": acc[0], "device_acc": acc[1], "decisions": decisions,
                              "decision_flips": flips, "decision_flips_allowed": allowed,
                              "routes_identical": flips == 0, "images_with_other_route": int(other_route.sum()),
                              "top1_disagreements": int(top1.sum()),
                              "top1_disagreements_same_route": int((top1 & ~other_route).sum()),
                              "max_logit_diff": (a.logits - b.logits).abs().max().item(),
                              "stage_reported_acc": metrics.get("routed_acc", metrics.get("test_acc")),
                              "images": len(paths)}
                checks[f"{stage}_decision_flips_within_tolerance"] = flips <= allowed
                checks[f"{stage}_top1_differs_only_where_routes_do"] = \
                    int((top1 & ~other_route).sum()) <= allowed_top1
        return {"compared": f"cpu vs {self.args.device}" if self.cuda else "cpu vs a second cpu load",
                "tolerance": f"on CUDA at most {FLIP_TOLERANCE:.1%} of the switch decisions may differ (a p within "
                             f"rounding of 0.5 goes either way) and top-1 only on images whose route differs or "
                             f"as few; a second CPU load must agree exactly",
                "note": "fp32 on both (TF32 off), the routed network (greedy switches, skipped blocks not run); "
                        "stage_reported_acc is the stage's own number (its final evaluation: fp32, TF32 off)",
                "stages": out, "checks": checks}

    def step_models(self):
        """name -> (model, step_fn, optimizer): the dense reference and each stage's own training step on
        its checkpoint, all prepared as the stages prepare them (built once)."""
        if self._models is None:
            self._models = self._build_step_models()
        return self._models

    def _build_step_models(self):
        from types import SimpleNamespace
        from stages import rl as main_rl_prune, sp as main_sp
        from gates.counterfactual import CounterfactualStep
        from gates.optim import make_optimizer
        from gates.policy import Baseline, ReinforceStep
        from gates.price import SkipPrice
        from models import build_model
        from runtime.checkpoint import load_checkpoint, model_from_checkpoint
        from runtime.steps import dense_step
        from runtime.loop import prepare
        from utils.flops import measure_costs
        ctx = self.context()
        sgd = SimpleNamespace(lr=0.01, momentum=0.9, weight_decay=5e-4, switch_lr=None, switch_weight_decay=None)
        out = {}
        arch = dict(load_checkpoint(self.ckpt("sp"), ("sp",))["arch"], ranks={})
        dense, _ = prepare(build_model(arch), ctx)
        out["dense_reference"] = (dense, lambda m, x, y: (F.cross_entropy(m(x, "open")[0], y), {}),
                                  torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                                  weight_decay=5e-4))
        # stage 3: its default controller (counterfactual, main_rl_prune's default blocks flipped per step), the
        # counterfactual's other form (every block flipped, or 4 sampled ones) and REINFORCE
        default = main_rl_prune.RLSettings.flip_blocks or None
        other = (f"stage3_counterfactual_{'all' if default else 4}", None if default else 4)
        for name, stage, step in (("stage1", "sp", main_sp.STEPS["joint"][0]), ("stage2", "prune", dense_step),
                                  ("stage3", "prune", ("counterfactual", default)),
                                  (other[0], "prune", ("counterfactual", other[1])),
                                  ("stage3_reinforce", "prune", "reinforce")):
            model, _ = prepare(model_from_checkpoint(load_checkpoint(self.ckpt(stage), (stage,))), ctx)
            if isinstance(step, tuple):  # stage 3 starts from stage 2's network, as main_rl_prune.py does
                costs = measure_costs(model, self.size["size"])
                step = CounterfactualStep(costs, SkipPrice(0.1, None, 0.05, ctx.device), 0.05, 0.1, blocks=step[1])
            elif step == "reinforce":
                costs = measure_costs(model, self.size["size"])
                step = ReinforceStep(costs, SkipPrice(0.1, None, 0.05, ctx.device), 1.0, 0.1,
                                     Baseline("moving", model.num_switches, 0.9, ctx.device))
            out[name] = (model, step, make_optimizer(model, sgd))
        return out

    def batch(self):
        ctx, s = self.context(), self.size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(s["bs"], 3, s["size"], s["size"], generator=g).to(ctx.device)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, s["classes"], (s["bs"],), generator=g).to(ctx.device)

    def train_steps(self, model, step_fn, optimizer, n):
        """n training steps as runtime.loop.train_epoch takes them (without its loss check every 25 steps)."""
        from runtime.loop import autocast
        x, y = self.batch()
        model.train()
        loss = None
        for _ in range(n):
            with autocast(self.ctx):
                loss, _ = step_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss

    def part_throughput(self):
        s, ctx = self.size, self.context()
        measured, checks = {}, {}
        for name, (model, step, opt) in self.step_models().items():
            self.train_steps(model, step, opt, s["warmup"])
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
                held = torch.cuda.memory_allocated(ctx.device)
            t0 = time.perf_counter()
            loss = self.train_steps(model, step, opt, s["timed_steps"])
            self.sync()
            dt = time.perf_counter() - t0
            measured[name] = {"images_per_s": round(s["timed_steps"] * s["bs"] / dt, 1),
                              "ms_per_step": round(1000 * dt / s["timed_steps"], 3), "loss": loss.item()}
            if self.cuda:  # the step's own: above what the models, optimizers and batch hold between steps
                measured[name]["step_peak_memory_gib"] = round(
                    (torch.cuda.max_memory_allocated(ctx.device) - held) / 2**30, 3)
            checks[f"{name}_loss_finite"] = math.isfinite(loss.item())
        ref = measured["dense_reference"]["images_per_s"]
        for rec in measured.values():
            rec["vs_dense_reference"] = round(rec["images_per_s"] / ref, 3)
        for name in [n for n in measured if n.startswith("stage3") and n != "stage3_reinforce"]:
            measured[name]["vs_reinforce"] = round(measured["stage3_reinforce"]["images_per_s"]
                                                   / measured[name]["images_per_s"], 3)
        return {"images_per_s": measured, "compile": compile_flags() or "not available",
                "note": f"{s['timed_steps']} timed steps after {s['warmup']} warm-up, batch {s['bs']}, one fixed "
                        f"random batch, amp={'bf16' if ctx.amp else 'off'}, channels_last={ctx.channels_last}; "
                        f"stage1 = joint step (two forward passes), stage2 = dense fine-tuning of the pruned "
                        f"network, stage3 = the default controller (counterfactual; vs_reinforce: its step time "
                        f"over REINFORCE's), stage3_counterfactual_* = its other form (every block flipped, or 4 "
                        f"sampled), stage3_reinforce = REINFORCE step (sampled routes, masked execution); "
                        f"step_peak_memory_gib (CUDA): peak allocated during the timed steps above what was held "
                        f"before them", "checks": checks}

    def part_tf32(self):
        """Stage 1's step at --amp off, TF32 off and on (cuDNN's float32 convolutions and cuBLAS's matmuls):
        whether allowing it (--tf32) pays for training. CUDA only."""
        if not self.cuda:
            return {"status": SKIPPED, "why": "CUDA only (TF32 is a CUDA tensor-core format)"}
        import dataclasses
        from utils.dist import set_tf32
        s, ctx = self.size, self.context()
        model, step, opt = self.step_models()["stage1"]
        saved, self.ctx = self.ctx, dataclasses.replace(ctx, amp=False)
        out = {}
        try:
            for tf32 in (False, True, False, True):  # interleaved: the second pair is the one kept
                set_tf32(tf32)
                self.train_steps(model, step, opt, s["warmup"])
                self.sync()
                t0 = time.perf_counter()
                self.train_steps(model, step, opt, s["timed_steps"])
                self.sync()
                out[f"tf32_{'on' if tf32 else 'off'}_ms_per_step"] = round(1000 * (time.perf_counter() - t0)
                                                                           / s["timed_steps"], 3)
        finally:
            set_tf32(False)
            self.ctx = saved
        out["speedup"] = round(out["tf32_off_ms_per_step"] / out["tf32_on_ms_per_step"], 3)
        return {**out, "checks": {"measured": out["speedup"] > 0},
                "note": "stage 1's joint step, float32 (--amp off); --tf32 allows it in training only (the final "
                        "evaluation and the counterfactual losses stay exact)"}

    def part_script_throughput(self):
        out = {}
        for name, stage, rdir in (("stage1", "sp", self.resumed), ("stage2", "prune", self.results),
                                  ("stage3", "rl", self.results)):
            secs = epoch_seconds(os.path.join(rdir, stage), stage)
            if secs:
                last = max(secs)
                out[name] = {"tensorboard_step": last, "epoch_seconds": round(secs[last], 3),
                             "images_per_s": round(self.train_images / secs[last], 1)}
        return {"last_epoch": out, "checks": {"read": len(out) == 3},
                "note": "training images / seconds of each script's last epoch (TensorBoard epoch_seconds), its "
                        "per-epoch evaluation included; stage 1's is the resumed run's"}

    def part_compile(self):
        flags = compile_flags()
        if not flags:
            return {"status": SKIPPED, "compile": "not available",
                    "why": "no --compile flag on main_sp.py / main_rl_prune.py, no 'compile' key in stage 2's config"}
        if self.args.quick or self.args.no_compile:
            return {"status": SKIPPED, "available": flags,
                    "why": "--quick: minutes of compiling (the full check compiles)" if self.args.quick else
                    "--no_compile"}
        # two epochs each: the first pays for compiling, the second is timed against the eager run's last;
        # later stages start from the eager chain's networks, so that both timings are of the same network
        rdir, runs, checks, epochs = os.path.join(self.work, "compiled"), {}, {}, 2
        cmds = {"sp": self.sp_cmd(rdir, epochs) + ["--compile"],
                "prune": self.prune_cmd(rdir, epochs) + ["--checkpoint", self.ckpt("sp"), "--set", "compile=true"],
                "rl": self.rl_cmd(rdir, epochs, checkpoint=self.ckpt("prune")) + ["--compile"]}
        if self.ddp_possible():  # stage 1 compiled under DistributedDataParallel: do CUDA graphs survive it?
            cmds["sp ddp"] = self.torchrun(2) + self.sp_cmd(os.path.join(rdir, "ddp"), epochs,
                                                            "cuda" if self.cuda else "cpu") + ["--compile"]
        if self.args.tiny:  # the path, on the CPU in seconds: stage 3, the default controller, alone
            cmds = {"rl": cmds["rl"]}
        for stage, cmd in cmds.items():
            if stage.split()[0] not in flags:
                runs[stage] = "not available"
                continue
            stage_dir = os.path.join(rdir, "ddp") if stage == "sp ddp" else rdir
            stage, name = stage.split()[0], stage
            rec = stage_record(self.python(cmd, COMPILE_TIMEOUT), stage, stage_dir, range(1, epochs + 1))
            rec["checks"]["compile_recorded"] = isinstance(rec.get("compile"), dict)
            compiled = epoch_seconds(os.path.join(stage_dir, stage), stage)
            eager = epoch_seconds(os.path.join(self.resumed if stage == "sp" else self.results, stage), stage)
            if len(compiled) == epochs and eager:
                first, last = (compiled[k] for k in sorted(compiled))
                rec.update(eager_images_per_s=round(self.train_images / eager[max(eager)], 1),
                           compiled_images_per_s=round(self.train_images / last, 1),
                           speedup=round(eager[max(eager)] / last, 3), first_epoch_seconds=round(first, 2))
            runs[name] = rec
            checks[name] = all(rec["checks"].values())
        graphs = {n: r["compile"].get("cuda_graphs") for n, r in runs.items() if isinstance(r, dict) and
                  isinstance(r.get("compile"), dict)}
        return {"available": flags, "runs": runs, "checks": checks, "cuda_graphs": graphs,
                "recompiles": {n: r["compile"].get("recompiles") for n, r in runs.items() if isinstance(r, dict)
                               and isinstance(r.get("compile"), dict)},
                "note": "images/s of a whole epoch (training + its evaluation), compiled (second epoch) against "
                        "eager (the chain's last epoch); cuda_graphs: whether the compiled step ran as CUDA graphs "
                        "(CUDA's reduce-overhead; false elsewhere), from each run's metrics.json \"compile\""}

    def part_profile(self):
        s = self.size
        n = s["profile_steps"]
        out = {}
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
        for name, (model, step, opt) in self.step_models().items():
            self.train_steps(model, step, opt, 2)  # lazy initialisation and cuDNN autotuning out of the count
            self.sync()
            with torch.profiler.profile(activities=acts) as prof:
                self.train_steps(model, step, opt, n)
                self.sync()
            events = prof.events()
            rec = {"aten_ops_per_step": sum(e.name.startswith("aten::") for e in events) / n}
            if self.cuda:
                gpu = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
                copies = sum(g.startswith(("Memcpy", "Memset")) for g in gpu)
                rec.update(kernels_per_step=(len(gpu) - copies) / n, memcpy_memset_per_step=copies / n)
                rec.update(count_syncs(lambda: self.train_steps(model, step, opt, n), n))
            out[name] = rec
        checks = {"aten_ops_seen": all(v["aten_ops_per_step"] > 0 for v in out.values())}
        if self.cuda:  # none seen: CUPTI unavailable (e.g. profiling not permitted to this user)
            checks["kernels_seen"] = all(v["kernels_per_step"] > 0 for v in out.values())
        return {"per_step": out, "steps": n, "checks": checks,
                "syncs": "counted with torch.cuda.set_sync_debug_mode('warn')" if self.cuda else
                "not counted on the CPU (no host-device synchronisation there)",
                "note": "aten_ops_per_step counts every aten:: op the profiler saw, nested ones included; the "
                        "training loop's own loss check (one sync every 25 steps) is not in these steps"}

    def part_cudnn_benchmark(self):
        if not self.cuda:
            return {"status": SKIPPED, "why": "CUDA only"}
        out, checks = {}, {}
        for label, stage, mode in (("routed", "rl", "hard"), ("dense", "sp", "open")):
            for bench in (False, True):
                proc = self.python([os.path.join("bench", "gpu_check.py"), "--device", self.args.device,
                                    "--_probe", self.ckpt(stage), "--_probe_mode", mode, "--_probe_bs",
                                    str(self.size["bs"]), "--_probe_benchmark", str(int(bench)), "--_probe_data",
                                    self.data])
                key = f"{label}_benchmark_{'on' if bench else 'off'}"
                if proc["rc"] == 0:
                    out[key] = json.loads(proc["stdout"].strip().splitlines()[-1])
                else:
                    out[key] = public(proc, False)
                checks[key] = proc["rc"] == 0
        return {"passes": out, "checks": checks,
                "note": "each row a fresh process (cuDNN's plan cache outlives the flag); seconds of the first and "
                        "second pass over the test images at the stages' batch size, bf16 + channels_last as in "
                        "their evaluation; routed = stage 3's network, whose gated blocks see sub-batches of "
                        "varying size (new shapes for cuDNN); both first passes also pay CUDA's lazy kernel "
                        "loading; the stages set benchmark on"}

    def ddp_possible(self):
        """2 processes of DistributedDataParallel can run here: 2 GPUs, or the CPU (gloo)."""
        return self.gpus >= 2 if self.cuda else True

    # ---- the whole run
    def run(self):
        """In --tiny (2 CPU cores) the subprocesses that do not wait for each other run beside the chain and
        beside this process's own measurements; otherwise everything runs one after the other, the timings
        first, so that nothing disturbs them."""
        r, tiny = self.report, self.args.tiny
        threads, stage3_done = [], threading.Event()

        def stage3_then_export():
            try:
                r.part("stage3", self.part_stage3, ("stage2",))
            finally:
                stage3_done.set()
            r.part("export", self.part_export, ("stage3",))

        r.part("data", self.part_data)
        r.part("stage1", self.part_stage1, ("data",))
        if tiny:
            threads.append(in_thread(lambda: r.part("stage1_resume", self.part_stage1_resume, ("stage1",))))
        else:
            r.part("stage1_resume", self.part_stage1_resume, ("stage1",))
        r.part("stage2", self.part_stage2, ("stage1",))
        if tiny:  # the profiler runs in the main thread (kineto wants the thread that set it up)
            threads.append(in_thread(stage3_then_export))
        else:
            r.part("stage3", self.part_stage3, ("stage2",))
        r.part("throughput", self.part_throughput, ("stage1", "stage2"))
        r.part("tf32", self.part_tf32, ("stage1",))
        r.part("profile", self.part_profile, ("stage1", "stage2"))
        if tiny:
            stage3_done.wait()
        r.part("cudnn_benchmark", self.part_cudnn_benchmark, ("stage1", "stage3"))
        if not tiny:  # the export runs on the CPU: beside what is left, after the timings
            threads.append(in_thread(lambda: r.part("export", self.part_export, ("stage3",))))
        r.part("reload", self.part_reload, ("stage1", "stage2", "stage3"))
        if not tiny:  # beside the export
            r.part("torchrun", self.part_torchrun, ("stage1_resume",))
        r.part("compile", self.part_compile, ("stage1", "stage1_resume", "stage2", "stage3"))
        for t in threads:
            t.join()
        if tiny:  # after stage1_resume, which ran in a thread
            r.part("torchrun", self.part_torchrun, ("stage1_resume",))
        r.part("script_throughput", self.part_script_throughput, ("stage1_resume", "stage2", "stage3"))
        r.part("finite_losses", self.part_finite_losses)
        return r


def compile_flags():
    """The stages that take a --compile flag (stage 2: a 'compile' config key), read from their --help."""
    import main_rl_prune
    import main_sp
    from pruners.config import KEYS
    out = []
    for stage, module in (("sp", main_sp), ("rl", main_rl_prune)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            module.parse_args(["--help"])
        if re.search(r"--compile\b", buf.getvalue()):
            out.append(stage)
    if "compile" in KEYS:
        out.insert(1 if out[:1] == ["sp"] else 0, "prune")
    return out


def count_syncs(fn, n):
    """Host syncs of fn() (n steps) per step, and the lines of code they came from."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites = collections.Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in syncs)
    return {"syncs_per_step": len(syncs) / n, "sync_sites": dict(sites.most_common(8))}


def probe(args):
    """One evaluation timing in a fresh process (cudnn_benchmark): prints one JSON line."""
    from runtime.checkpoint import load_checkpoint, model_from_checkpoint
    from utils.data import Preprocess
    from utils.dist import setup
    from runtime.loop import autocast, prepare
    ctx = setup(args.device, seed=0)
    torch.backends.cudnn.benchmark = bool(args._probe_benchmark)
    torch.ones(1, device=ctx.device).sum().item()  # CUDA context up before anything is timed
    ckpt = load_checkpoint(args._probe, flag="checkpoint")
    model, _ = prepare(model_from_checkpoint(ckpt, args._probe, "checkpoint"), ctx)
    model.eval()
    paths = sorted(glob.glob(os.path.join(args._probe_data, "test", "*", "*.png")))
    x = Preprocess(ckpt["pipeline"])(paths, ctx.device)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        for _ in range(2):
            torch.cuda.synchronize(ctx.device)
            t0 = time.perf_counter()
            for i in range(0, len(x), args._probe_bs):
                with autocast(ctx):
                    model(x[i:i + args._probe_bs], args._probe_mode)
            torch.cuda.synchronize(ctx.device)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"first_pass_s": round(times[0], 4), "second_pass_s": round(times[1], 4),
                      "first_over_second": round(times[0] / times[1], 2), "images": len(x)}))


def summary(data):
    """A few lines for a person; the JSON holds the rest."""
    parts = data["parts"]
    kind = ", quick" if data.get("quick") else ", tiny" if data["tiny"] else ""
    lines = [f"gpu_check on {data['device']} ({data.get('gpu_name') or 'CPU'}, torch {data['torch']}{kind}): "
             f"{data['seconds']:.0f} s (estimated on one H100: {data['estimate_h100_seconds']['total']:.0f} s)"]
    for name, rec in parts.items():
        status = rec.get("status")
        detail = rec.get("why") or rec.get("error") or ""
        if rec.get("failed_checks"):
            detail = "failed: " + ", ".join(rec["failed_checks"])
        if status == OK and name in ("stage1", "stage1_resume", "stage2", "stage3") and rec.get("losses"):
            detail = f"last train loss {rec['losses'][-1]['train_loss']:.3f}, test acc {rec.get('test_acc', 0):.2f}%"
            peak = rec.get("peak_memory") or {}
            if "cuda_max_allocated_gib" in peak:
                detail += f", peak {peak['cuda_max_allocated_gib']:.2f} GiB"
        if status == OK and name == "throughput":
            detail = ", ".join(f"{k} {v['images_per_s']:.0f} img/s" for k, v in rec["images_per_s"].items())
        if status == OK and name == "tf32":
            detail = f"--amp off step {rec['tf32_off_ms_per_step']} ms (TF32 off) vs {rec['tf32_on_ms_per_step']} ms (on)"
        if status == OK and name == "reload":
            detail = ", ".join(f"{k} {v['decision_flips']}/{v['decisions']} decisions flipped"
                               for k, v in rec["stages"].items())
        if status == OK and name == "compile":
            detail = ", ".join(f"{k}: CUDA graphs {'yes' if g else 'no'}, {rec['recompiles'].get(k)} recompiles"
                               for k, g in rec["cuda_graphs"].items())
        if status == OK and name == "profile":
            key = "syncs_per_step" if "syncs_per_step" in rec["per_step"].get("stage1", {}) else "aten_ops_per_step"
            detail = f"{key}: " + ", ".join(f"{k} {v[key]:g}" for k, v in rec["per_step"].items())
            if "kernels_per_step" in rec["per_step"].get("stage1", {}):
                detail += "; kernels_per_step: " + ", ".join(
                    f"{k} {v['kernels_per_step']:g}" for k, v in rec["per_step"].items())
        if status == OK and name == "cudnn_benchmark":
            detail = ", ".join(f"{k} {v.get('first_pass_s')}/{v.get('second_pass_s')} s"
                               for k, v in rec["passes"].items())
        lines.append(f"  {name:<17} {status:<8} {detail}"[:240])
    bad = [n for n, rec in parts.items() if rec.get("status") in (FAILED, NOT_RUN)]
    untested = [n for n, rec in parts.items() if rec.get("status") == SKIPPED and
                str(rec.get("why", "")).startswith("untested")]
    if bad:
        lines.append("FAILED: " + ", ".join(bad))
    else:
        lines.append("all checks passed" + (f"; untested here: {', '.join(untested)}" if untested else ""))
    return "\n".join(lines)


def default_out(args):
    """results/gpu_check[_quick][_tiny][_cpu].json: each kind of run its own record."""
    suffix = ("_quick" if args.quick else "") + ("_tiny" if args.tiny else "") + \
        ("" if args.device.startswith("cuda") else "_cpu")
    return os.path.join("results", f"gpu_check{suffix}.json")


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", default=None,
                   help="cuda or cuda:N (default: cuda; without a usable GPU the check exits 1), or cpu")
    p.add_argument("--quick", action="store_true", help="2,000 training images, 64 steps per stage, no compiled "
                   "runs: under 5 minutes on one H100-class GPU by estimate (its own --out)")
    p.add_argument("--tiny", action="store_true", help="4 classes at 16x16, ResNet-8 width 1, a few steps (a smoke "
                   "test, under a minute on a CPU)")
    p.add_argument("--out", default=None, help="the JSON written (default: results/gpu_check.json, with _quick, "
                   "_tiny, _cpu in its name for those runs)")
    p.add_argument("--steps", type=int, default=None, help="training steps per stage, rounded to whole epochs "
                   f"(default: {SIZES['full']['steps']}, --quick {SIZES['quick']['steps']}, "
                   f"--tiny {SIZES['tiny']['steps']})")
    p.add_argument("--no_compile", action="store_true", help="skip the runs with the stages' --compile (minutes of "
                   "compiling)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, results, export)")
    for hidden in ("--_probe", "--_probe_mode", "--_probe_data"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--_probe_bs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_probe_benchmark", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._probe:
        return probe(args)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.device is None or args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            from utils.dist import cuda_missing
            why = cuda_missing() or "this torch is built without CUDA"
            print(f"gpu_check: no usable CUDA GPU ({why}; torch {torch.__version__}, CUDA {torch.version.cuda}): "
                  f"nothing checked. --device cpu runs the check on the CPU", file=sys.stderr, flush=True)
            return 1
        args.device = args.device or "cuda"
    args.out = args.out or default_out(args)
    if not args.device.startswith("cuda") and not args.tiny:
        print("gpu_check: ResNet-32 k=4 on the CPU takes far longer than on a GPU (--tiny: a one-minute smoke test)",
              file=sys.stderr, flush=True)
    if args.tiny:
        torch.set_num_threads(1)  # the subprocesses beside it have a core each
    t0 = time.perf_counter()
    check = Check(args)
    try:
        report = check.run()
    finally:
        if args.keep:
            print(f"kept {check.work}")
        else:
            shutil.rmtree(check.work, ignore_errors=True)
    report.data["seconds"] = round(time.perf_counter() - t0, 1)
    bad = [n for n, rec in report.data["parts"].items() if rec.get("status") in (FAILED, NOT_RUN)]
    report.data["ok"] = not bad
    report.data["failed"] = bad
    report.data["untested"] = [n for n, rec in report.data["parts"].items() if rec.get("status") == SKIPPED and
                               str(rec.get("why", "")).startswith("untested")]
    report.write()
    print(summary(report.data))
    print(f"-> {os.path.abspath(args.out)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
