"""Scale out (issue: never lose work): every stage under torchrun --nproc_per_node=2 (gloo) completes, its
checkpoint loads in one process and gives back metrics.json's numbers there; a resume with another number of
processes is refused; stage 2's Fisher factors of two ranks equal one rank's; a rank stopping on an error
ends its process group before it exits."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import PIPELINE_RL as RL
from conftest import ROOT, STAGE1_DATA, STAGE1_FLAGS, prune_config
from helpers import snapshot
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.errors import UserError, run_main

SP = [*STAGE1_FLAGS, "--bs", "16"]


def evaluate_in_one_process(model, ckpt, data_dir, mode):
    """The test-set evaluation of `model` (a checkpoint's network) in this one process, as metrics.json's."""
    from runtime.evaluate import evaluate
    from utils.data import DataSettings, load_data
    from utils.dist import Context
    from utils.flops import measure_costs
    ctx = Context(device=torch.device("cpu"), amp=False)
    data = load_data(DataSettings(data_dir=data_dir, bs=8), ctx, recorded=ckpt["pipeline"], source="checkpoint")
    return evaluate(model, data.test, ctx, measure_costs(model, data.image_size), mode=mode)


def torchrun(argv, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module", params=["sp", "prune", "rl", "rl-gumbel"])
def two_processes(request, pipeline, tmp_path_factory):
    """One stage run under torchrun --nproc_per_node=2 (gloo) from the `pipeline` fixture's earlier stages:
    (stage, argv of the run, its result dir, data dir)."""
    controller = ["--controller", "gumbel"] if request.param == "rl-gumbel" else []
    stage = request.param.split("-")[0]
    tmp, data, res = pipeline
    out = tmp_path_factory.mktemp(f"ddp-{request.param}") / "ddp"
    if stage != "sp":
        shutil.copytree(res / "sp", out / "sp")
        if stage == "rl":
            shutil.copytree(res / "prune", out / "prune")
    if stage == "prune":
        argv = ["main_prune.py", "--config_path", prune_config(out.parent / "c.json", out, data, bs=8)]
    else:
        argv = ["main_sp.py" if stage == "sp" else "main_rl_prune.py", *(SP if stage == "sp" else RL),
                "--bs", "8", "--epochs", "1", "--data_dir", data, "--result_dir", str(out)]
    if stage == "rl":  # the dual ascent, the calibrations and a route epoch (greedy_step) under DDP too
        target = 0.8 * json.load(open(res / "prune" / "metrics.json"))["dense_gflops"]
        argv += ["--target_gflops", str(target), "--route_epochs", "1", *controller]
    proc = torchrun(argv)
    # the workers' own lines come first, torchrun's summary last: show both
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    return stage, argv, out, data


@pytest.mark.slow
def test_torchrun_two_processes(two_processes):
    stage, _, out, _ = two_processes
    path = str(out / stage / "checkpoint.pt")
    model = model_from_checkpoint(load_checkpoint(path, (stage,)), path).eval()
    logits, _, _ = model(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(logits).all()
    metrics = json.load(open(out / stage / "metrics.json"))
    assert metrics["test_images"] == STAGE1_DATA["classes"] * STAGE1_DATA["test_per_class"]  # every test image, once
    if stage == "rl":
        assert len(metrics["ending"]["route_epochs"]) == 1 and len(metrics["ending"]["calibration"]) == 2


@pytest.mark.slow
def test_metrics_under_torchrun_are_the_saved_networks(two_processes):
    """Each rank evaluates its share of the test images: with the BatchNorm statistics the checkpoint saves
    (rank 0's), so one process re-evaluating the checkpoint gets metrics.json's accuracy and loss."""
    stage, _, out, data = two_processes
    path = str(out / stage / "checkpoint.pt")
    ckpt = load_checkpoint(path, (stage,))
    metrics = json.load(open(out / stage / "metrics.json"))
    again = evaluate_in_one_process(model_from_checkpoint(ckpt, path).eval(), ckpt, data, metrics["mode"])
    assert again["images"] == metrics["test_images"] and again["acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused(two_processes):
    """--bs is per process: resumed with another world size, the global batch and the schedule's length
    would change under the run. Refused in one line naming both, before anything is touched."""
    import main_prune
    import main_rl_prune
    import main_sp
    stage, argv, out, _ = two_processes
    before = snapshot(out)
    main = {"sp": main_sp, "prune": main_prune, "rl": main_rl_prune}[stage].main
    with pytest.raises(UserError) as e:
        main([*argv[1:], "--resume"])  # in this one process
    assert "started with 2 process(es), this one has 1" in str(e.value) and "\n" not in str(e.value), e.value
    assert snapshot(out) == before


@pytest.mark.slow
def test_resume_of_a_one_process_run_under_torchrun_is_refused(trained_stage1, tmp_path):
    _, data, base = trained_stage1
    shutil.copytree(base / "sp", tmp_path / "sp")
    before = snapshot(tmp_path)
    proc = torchrun(["main_sp.py", *STAGE1_FLAGS, "--epochs", "4", "--dense_epochs", "2", "--bs", "16", "--val_split",
                     "0.25", "--data_dir", data, "--result_dir", str(tmp_path), "--resume"])
    # each process says it in one line (torchrun's own report of the failed processes follows them)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
    assert all("started with 1 process(es), this one has 2" in line for line in errors), errors
    assert snapshot(tmp_path) == before


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


# ------------------------------------------------------------- the global batch; images decoded once per machine

@pytest.mark.slow
def test_torchrun_bs_is_the_global_batch_and_images_are_decoded_once(trained_stage1, tmp_path):
    """Under torchrun --bs is the batch of a step over all processes: 2 processes at --bs 16 take 8 images each
    and run as many steps per epoch as one process at --bs 16 (the same learning-rate schedule), and the
    first line says so. Only local rank 0 decodes the images (the process of local rank 1 is killed if it
    starts to), and the decoded copy is gone after. A batch the processes cannot share evenly is refused."""
    _, data, _ = trained_stage1
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DYNPRUNE_KILL_AT": "decode:1", "TMPDIR": str(tmp)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_sp.py",
            *STAGE1_FLAGS, "--epochs", "1", "--data_dir", data]
    proc = subprocess.run([*argv, "--bs", "16", "--result_dir", str(tmp_path / "two")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert "2 processes, batch 16 per step in all (8 per process)" in first, proc.stdout[:500]
    ckpt = load_checkpoint(str(tmp_path / "two" / "sp" / "checkpoint.pt"), ("sp",))
    train_images = STAGE1_DATA["classes"] * STAGE1_DATA["train_per_class"]
    assert ckpt["scheduler"]["last_epoch"] == train_images // 16  # one process at --bs 16: 6 steps an epoch
    assert not list(tmp.glob("dynprune-*")), list(tmp.iterdir())  # (torchrun keeps a folder of its own there)
    bad = subprocess.run([*argv, "--bs", "15", "--result_dir", str(tmp_path / "bad")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert bad.returncode != 0 and "batch size 15" in bad.stderr and "2 does not divide it" in bad.stderr \
        and "use 14 or 16" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad" / "sp").exists()  # refused before any work (torchrun then reports the exit)


def _load_on_rank(rank, port, data_dir, out_dir):
    """One of two torchrun-like processes on one machine: load_data, counting the images this process
    decodes; writes what it loaded (or the error it raised) to out_dir/rank<r>.pt."""
    import utils.data
    from utils.data import DataSettings, load_data
    from utils.dist import setup, teardown
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=os.path.join(out_dir, "tmp"))
    import tempfile
    tempfile.tempdir = None  # TMPDIR read again
    decoded = []
    real = utils.data._decode_chunk
    utils.data._decode_chunk = lambda paths, size: decoded.append(len(paths)) or real(paths, size)
    out = {"decoded": decoded}
    ctx = setup("cpu")
    try:
        data = load_data(DataSettings(data_dir=data_dir, bs=8, num_workers=0), ctx)
        out.update(train=data.train.x.clone(), test=data.test.x.clone(), classes=data.pipeline["classes"],
                   batch=data.train.batch_size)
    except UserError as e:
        out["error"] = str(e)
    teardown()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_images_decoded_once_per_machine_and_its_errors_on_every_rank(trained_stage1, tmp_path):
    """Two processes of one machine (gloo): local rank 0 decodes every image, local rank 1 none, both hold the
    images one process loads, each half the batch, and the temporary copy is removed; a data directory
    local rank 0 cannot read is every rank's one-line error (no rank left waiting)."""
    import torch.multiprocessing as mp
    from utils.data import DataSettings, load_data
    from utils.dist import Context
    _, data, _ = trained_stage1
    (tmp_path / "tmp").mkdir()
    mp.spawn(_load_on_rank, args=(_free_port(), data, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = load_data(DataSettings(data_dir=data, bs=8, num_workers=0), Context(device=torch.device("cpu")))
    n = len(one.train.x) + len(one.test.x)
    assert sum(ranks[0]["decoded"]) == n and ranks[1]["decoded"] == []
    for r in ranks:
        assert torch.equal(r["train"], one.train.x) and torch.equal(r["test"], one.test.x)
        assert r["classes"] == one.pipeline["classes"] and r["batch"] == 4
    assert list((tmp_path / "tmp").iterdir()) == []

    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "test" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.png").write_bytes(b"not a png")
    (bad / "test" / "a" / "y.png").write_bytes(b"not a png")
    mp.spawn(_load_on_rank, args=(_free_port(), str(bad), str(tmp_path)), nprocs=2)
    errors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert errors[0]["error"] == errors[1]["error"] and "cannot read image" in errors[0]["error"], errors
    assert errors[1]["decoded"] == [] and list((tmp_path / "tmp").iterdir()) == []
