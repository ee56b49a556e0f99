"""The seed's three commands, run in order as a user runs them (paths aside; small --epochs, and
--width 1 for stage 1 so that ResNet-32 trains in seconds on a CPU), on a dataset in the PNG layout."""
import json
import os

import pytest
import torch

import main_rl_prune
from conftest import ROOT
from helpers import CPU_FALLBACK, assert_one_line_error, run_script, snapshot, stderr_lines, tiny_dataset
from utils.dist import cuda_missing
from utils.errors import UserError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # small convs: a second thread gains little, and much is lost on shared cores

SEED_CONFIG = "config.json"  # the stage-2 config shipped with the project


def stage1(data, results):
    return ["main_sp.py", "--network", "resnet", "--depth", "32", "--epochs", "1", "--lr", "0.0001", "--bs", "128",
            "--num_workers", "16", "--momentum", "0.9", "--weight_decay", "0.0005", "--img_type", "png",
            "--resize", "32", "--result_dir", results, "--data_dir", data, "--width", "1"]


def stage3(data, results):
    return ["main_rl_prune.py", "--network", "resnet", "--depth", "32", "--epochs", "1", "--lr", "0.001", "--bs",
            "256", "--num_workers", "16", "--momentum", "0.9", "--weight_decay", "0.0005", "--img_type", "png",
            "--resize", "32", "--result_dir", results, "--data_dir", data, "--alpha", "0.1", "--gamma", "1",
            "--rl_weight", "0.1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = tiny_dataset(tmp / "data", classes=10, train_per_class=26, test_per_class=5, size=32)  # >= bs 256
    results = str(tmp / "results")
    with open(os.path.join(ROOT, SEED_CONFIG)) as f:
        config = json.load(f)
    config.update(result_dir=results, data_dir=data, epochs=1, fisher_batches=2)
    with open(tmp / "config.json", "w") as f:
        json.dump(config, f)
    procs = [run_script(*stage1(data, results), env=ONE_THREAD),
             run_script("main_prune.py", "--config_path", str(tmp / "config.json"), env=ONE_THREAD),
             run_script(*stage3(data, results), env=ONE_THREAD)]
    return tmp, data, results, procs


@pytest.mark.slow
def test_seed_commands_run_in_order_and_write_the_table(pipeline):
    tmp, data, results, procs = pipeline
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.load(open(f"{results}/{stage}/metrics.json")) for stage in ("sp", "prune", "rl")]
    table = json.load(open(f"{results}/table.json"))["rows"]
    assert [r["method"] for r in table] == ["w/o pruning", "static pruning only", "static + dynamic pruning"]
    for row, m in zip(table, metrics):
        assert row["accuracy"] == m["test_acc"] and row["gflops_per_image"] == m["gflops_per_image"]
    assert table[1]["compression"] == pytest.approx(0.6, abs=0.011)  # the seed config's target
    assert table[2]["compression"] == table[1]["compression"]
    markdown = open(f"{results}/table.md").read()
    assert len([l for l in markdown.splitlines() if l.startswith("| ")]) == 4 and "static + dynamic pruning" in markdown
    assert markdown in procs[2].stdout  # stage 3 prints it too


@pytest.mark.slow
def test_logs_hold_summaries_and_no_bar_fragments_when_not_on_a_terminal(pipeline):
    """stderr is a pipe here, as under nohup or a scheduler: no tqdm refreshes, the summaries in stdout;
    the seed's stage-1 command (lr 1e-4, no --pretrained) gets one line of warning."""
    tmp, data, results, procs = pipeline
    for proc in procs:
        assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-500:]
        assert "epoch 1/1" in proc.stdout
    warnings = stderr_lines(procs[0])
    assert len(warnings) == 1 and "--lr 0.0001" in warnings[0] and "--pretrained" in warnings[0]
    assert not stderr_lines(procs[2])
    # a CUDA build of torch without a usable GPU says once per stage that it runs on the CPU; nothing else does
    fallback = int(bool(cuda_missing()) and not torch.cuda.is_available())
    assert [p.stderr.count(CPU_FALLBACK) for p in procs] == [fallback] * 3, [p.stderr for p in procs]


@pytest.mark.slow
def test_stages_refuse_a_checkpoint_from_the_wrong_place(pipeline):
    tmp, data, results, procs = pipeline
    before = snapshot(results)
    with open(tmp / "config.json") as f:
        config = json.load(f)
    config["checkpoint"] = f"{results}/prune/checkpoint.pt"  # stage 2 must start from stage 1's
    with open(tmp / "wrong.json", "w") as f:
        json.dump(config, f)
    cases = [
        (["main_sp.py", *stage1(data, results)[1:], "--resume", f"{results}/rl/checkpoint.pt"], ["stage 3", "stage 1"]),
        (["main_prune.py", "--config_path", str(tmp / "wrong.json")], ["stage 2", "stage 1"]),
        ([*stage3(data, results), "--checkpoint", f"{results}/rl/checkpoint.pt"], ["stage 3", "expected"]),
        ([*stage3(data, results)[:4], "20", *stage3(data, results)[5:]], ["--depth 20", "resnet-32"]),
    ]
    for argv, words in cases:
        assert_one_line_error(run_script(*argv), *words)
    # the same checks in-process, cheaper: no file there, or nothing to start from
    for argv, words in [([*stage3(data, results)[1:], "--checkpoint", f"{tmp}/none.pt"], ["none.pt", "no such file"]),
                        (stage3(data, str(tmp / "empty"))[1:], ["no checkpoint", "main_sp.py"])]:
        with pytest.raises(UserError) as e:
            main_rl_prune.main(argv)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    assert snapshot(results) == before
