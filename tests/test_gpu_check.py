"""bench/gpu_check.sh, the first command on a GPU machine, in its --tiny mode on the CPU: every part runs
and passes, in under two minutes of CPU time; without a usable GPU (and no --device cpu) it exits 1, started
by a PATH that has only python3; --quick fits in 5 minutes on one H100 by its parts' estimate."""
import json
import math
import os
import resource
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

PARTS = ("data", "stage1", "stage1_resume", "stage2", "stage3", "finite_losses", "torchrun", "reload", "export",
         "throughput", "tf32", "compile", "profile", "cudnn_benchmark", "script_throughput")


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "x.json"
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(["bash", os.path.join("bench", "gpu_check.sh"), "--device", "cpu", "--tiny", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # its own CPU time, not the wall clock, which a loaded machine stretches (72 s at load 6.4 for 47 CPU-s):
    # the tiny check stays a quick first command (25-50 CPU-s measured)
    assert cpu < 120, f"{cpu:.0f} CPU-s ({seconds:.0f} s wall; load average {os.getloadavg()[0]:.1f})"
    assert "all checks passed" in proc.stdout

    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["ok"] is True and report["failed"] == []
    assert set(PARTS) <= set(parts), sorted(set(PARTS) - set(parts))
    for name in PARTS:
        expected = "skipped" if name in ("cudnn_benchmark", "tf32") else "ok"  # CUDA only
        assert parts[name]["status"] == expected, (name, parts[name])
    assert report["untested"] == [] and report["quick"] is False
    assert report["precision_flags"]["cudnn_allow_tf32"] is False and report["precision_flags"]["amp"] == "off"
    assert report["estimate_h100_seconds"]["total"] > 0

    # finite losses, from every stage's printed summaries and its metrics.json
    for name in ("stage1", "stage1_resume", "stage2", "stage3"):
        losses = parts["finite_losses"]["losses"][name]
        assert losses["train"] and all(math.isfinite(v) for v in losses["train"] + losses["eval"])
        assert math.isfinite(losses["final"])
    assert parts["stage1_resume"]["cmd"].startswith("python -m torch.distributed.run --standalone "
                                                     "--nproc_per_node=1 main_sp.py")

    # resume continued where the first run stopped, in the same run
    resume = parts["stage1_resume"]
    assert resume["checks"] == {k: True for k in resume["checks"]}
    assert [e["epoch"] for e in resume["losses"]] == list(range(resume["first_run_epochs"] + 1,
                                                                resume["resumed_to"] + 1))
    assert resume["checkpoint_epoch"] == resume["resumed_to"]

    # every stage's metrics: its training precision, its peak memory
    for name in ("stage1", "stage2", "stage3"):
        assert parts[name]["precision"]["final_evaluation"] == "float32, TF32 off", parts[name]
        assert parts[name]["peak_memory"]["host_peak_rss_gib"] > 0
    assert parts["stage3"]["controller"] == "counterfactual"  # the default, as a user runs it

    # reload: decision flips counted (a second CPU load: none allowed), equal top-1, for every stage's checkpoint
    for stage, rec in parts["reload"]["stages"].items():
        assert rec["decision_flips"] == 0 == rec["decision_flips_allowed"] and rec["decisions"] > 0, (stage, rec)
        assert rec["routes_identical"] and rec["top1_disagreements"] == 0, (stage, rec)
        assert rec["cpu_acc"] == rec["device_acc"] and rec["images"] > 0

    export = parts["export"]
    assert export["checks"] == {"exit_status_0": True, "files_written": True, "outputs_match": True}
    assert {"onnx", "pt2", "onnx_b1", "pt2_b1"} <= set(export["files_bytes"])

    # measurements: numbers, and on the CPU the ATen ops per step instead of kernels and syncs
    speeds = parts["throughput"]["images_per_s"]
    other = {"stage3_counterfactual_all", "stage3_counterfactual_4"} & set(speeds)  # the form not the default
    assert set(speeds) == {"dense_reference", "stage1", "stage2", "stage3", "stage3_reinforce"} | other
    assert len(other) == 1 and all(v["images_per_s"] > 0 and math.isfinite(v["loss"]) for v in speeds.values())
    assert speeds["stage3"]["vs_reinforce"] > 0  # the default controller's step against REINFORCE's
    # the stages' --compile flags; --tiny compiles stage 3 alone, and records what torch.compile did
    compile_flags = parts["throughput"]["compile"]
    assert compile_flags == "not available" or set(compile_flags) <= {"sp", "prune", "rl"}
    assert set(parts["compile"]["runs"]) == {"rl"} and parts["compile"]["cuda_graphs"] == {"rl": False}
    assert parts["compile"]["runs"]["rl"]["compile"]["graphs"] >= 1 and parts["compile"]["recompiles"] == {"rl": 0}
    per_step = parts["profile"]["per_step"]
    assert set(per_step) == set(speeds)
    assert all(v["aten_ops_per_step"] > 0 and "syncs_per_step" not in v for v in per_step.values())
    assert parts["cudnn_benchmark"]["why"] == "CUDA only"
    assert set(parts["script_throughput"]["last_epoch"]) == {"stage1", "stage2", "stage3"}
    # DistributedDataParallel with 2 processes (gloo on the CPU), --bs the batch of both
    torchrun = parts["torchrun"]
    assert torchrun["backend"] == "gloo" and set(torchrun["checks"]) == {"2proc sp", "2proc prune", "2proc rl"}
    assert all(torchrun["runs"][k]["checks"]["global_batch_said"] for k in torchrun["checks"])
    assert set(parts["finite_losses"]["losses"]) >= {"torchrun 2proc sp", "torchrun 2proc rl"}


def test_without_a_gpu_it_exits_1_and_needs_only_python3(tmp_path):
    """No usable GPU and no --device cpu: one line saying why, exit status 1, nothing written; started by
    bench/gpu_check.sh on a PATH that has python3 and no python (a fresh image)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", CUDA_VISIBLE_DEVICES="")  # no python; no GPU, on any machine
    out = tmp_path / "x.json"
    proc = subprocess.run(["bash", os.path.join("bench", "gpu_check.sh"), "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0] and "--device cpu" in lines[0], proc.stderr
    assert "CUDA_VISIBLE_DEVICES" in lines[0] or torch.version.cuda is None, lines[0]
    assert not out.exists()
    env["PYTHON"] = sys.executable  # the interpreter named: the same answer
    proc = subprocess.run(["bash", os.path.join("bench", "gpu_check.sh"), "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "no usable CUDA GPU" in proc.stderr and not out.exists(), proc.stderr[-2000:]


def test_quick_fits_five_minutes_on_one_gpu_by_estimate_and_writes_its_own_file():
    from argparse import Namespace
    from bench.gpu_check import SIZES, default_out, estimate
    quick = estimate(SIZES["quick"], compiled=False, gpus=1)
    assert 0 < quick["total"] < 300, quick
    assert quick["parts"]["compile"] == 0 and estimate(SIZES["full"])["total"] > quick["total"]
    names = {default_out(Namespace(quick=q, tiny=t, device=d)) for q in (False, True) for t in (False, True)
             for d in ("cuda", "cpu")}
    assert len(names) == 8 and os.path.join("results", "gpu_check.json") in names
    assert default_out(Namespace(quick=True, tiny=False, device="cuda:1")).endswith("gpu_check_quick.json")


def test_bench_controller_measures_every_step_kind(tmp_path):
    """bench/bench_controller.py (docs/speed.md's controller costs) at a tiny size: every step kind timed
    against REINFORCE and dense, and a peak memory per kind measured in its own process."""
    out = tmp_path / "controller.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_controller.py"), "--depth", "8", "--width",
                    "1", "--bs", "8", "--repeats", "1", "--threads", "1", "--flip_blocks", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    rec = json.loads(out.read_text())
    kinds = {"dense", "reinforce", "counterfactual", "cf_1"}
    assert set(rec["time"]["8"]) == kinds and set(rec["memory"]["8"]) == kinds
    assert rec["time"]["8"]["reinforce"]["vs_reinforce"] == 1.0
    assert all(t["seconds"] > 0 and t["vs_dense"] > 0 for t in rec["time"]["8"].values())
    assert all(m["step_peak_gib"] > 0 for m in rec["memory"]["8"].values())
