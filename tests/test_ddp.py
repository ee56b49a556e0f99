"""Scale out (issue: never lose work): every stage under torchrun --nproc_per_node=2 (gloo) completes and its
checkpoint loads in one process; stage 2's Fisher factors of two ranks equal one rank's; a rank stopping on
an error ends its process group before it exits."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PIPELINE_RL as RL
from conftest import ROOT, STAGE1_DATA, STAGE1_FLAGS, prune_config
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.errors import UserError, run_main

SP = [*STAGE1_FLAGS, "--bs", "16"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sp", "prune", "rl", "rl-gumbel"])
def test_torchrun_two_processes(pipeline, tmp_path, stage):
    tmp, data, res = pipeline
    controller = ["--controller", "gumbel"] if stage == "rl-gumbel" else []
    stage = stage.split("-")[0]
    out = tmp_path / "ddp"
    if stage != "sp":
        shutil.copytree(res / "sp", out / "sp")
        if stage == "rl":
            shutil.copytree(res / "prune", out / "prune")
    if stage == "prune":
        argv = ["main_prune.py", "--config_path", prune_config(tmp_path / "c.json", out, data, bs=8)]
    else:
        argv = ["main_sp.py" if stage == "sp" else "main_rl_prune.py", *(SP if stage == "sp" else RL),
                "--bs", "8", "--epochs", "1", "--data_dir", data, "--result_dir", str(out)]
    if stage == "rl":  # the dual ascent, the calibrations and a route epoch (greedy_step) under DDP too
        target = 0.8 * json.load(open(res / "prune" / "metrics.json"))["dense_gflops"]
        argv += ["--target_gflops", str(target), "--route_epochs", "1", *controller]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the workers' own lines come first, torchrun's summary last: show both
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    path = str(out / stage / "checkpoint.pt")
    ckpt = load_checkpoint(path, (stage,))
    model = model_from_checkpoint(ckpt, path).eval()
    logits, _, _ = model(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(logits).all()
    metrics = json.load(open(out / stage / "metrics.json"))
    assert metrics["test_images"] == STAGE1_DATA["classes"] * STAGE1_DATA["test_per_class"]  # every test image, once
    if stage == "rl":
        assert len(metrics["ending"]["route_epochs"]) == 1 and len(metrics["ending"]["calibration"]) == 2


def _factors_on_rank(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from models import build_model, make_arch
    from pruners import collect_factors
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=5)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    mine = [(x[rank::world_size], y[rank::world_size]) for x, y in batches]  # this rank's share of each batch
    factors = collect_factors(model, mine, "empirical", progress=False)
    if rank == 0:
        torch.save({n: (f.A, f.G) for n, f in factors.items()}, os.path.join(out_dir, f"factors{world_size}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_stage2_factors_of_two_ranks_equal_one_rank(tmp_path):
    import torch.multiprocessing as mp
    for world_size in (1, 2):
        mp.spawn(_factors_on_rank, args=(world_size, str(tmp_path / f"init{world_size}"), str(tmp_path)),
                 nprocs=world_size)
    one = torch.load(tmp_path / "factors1.pt", weights_only=True)
    two = torch.load(tmp_path / "factors2.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) >= 7
    for name in one:
        torch.testing.assert_close(two[name][0], one[name][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two[name][1], one[name][1], rtol=1e-5, atol=1e-7)


def test_an_error_ends_the_process_group_before_the_exit(tmp_path, capsys):
    """A rank stopping on an error destroys its process group before exiting (without waiting for the
    others): gloo's threads alive at interpreter shutdown would abort the process and hide its message."""
    import torch.distributed as dist

    def main():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise UserError("bad input")

    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad input\n"
    assert not dist.is_initialized()
