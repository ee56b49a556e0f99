"""Rows that mean what they say and reruns that never mix networks: row 2 is the pruned network with every
block, each stage records the checkpoint it started from, reruns into a folder with later results are
refused or move them aside, the table and later stages refuse a broken chain, TensorBoard steps continue
across stages, and the README's GPU commands chain when copied."""
import json
import math
import os
import re
import shlex

import pytest

import main_prune
import main_rl_prune
import main_sp
from helpers import snapshot, tiny_dataset
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.errors import UserError
from utils.flops import dense_flops, measure_costs
from utils.lineage import file_sha256
from runtime.table import build_table

from conftest import ROOT

SIZE = 16
TINY = ["--depth", "8", "--bs", "32", "--num_workers", "0", "--device", "cpu"]


def prune_config(path, results, data, **extra):
    cfg = {"result_dir": str(results), "data_dir": data, "compression": 0.5, "epochs": 1, "lr": 0.01, "bs": 32,
           "fisher_batches": 2, "num_workers": 0, "device": "cpu", **extra}
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("lineage") / "data", classes=4, train_per_class=32,
                        test_per_class=16, size=SIZE)


def stage1(results, data, *extra):
    main_sp.main([*TINY, "--width", "1", "--lr", "0.05", "--resize", str(SIZE), "--epochs", "2", "--data_dir", data,
                  "--result_dir", str(results), *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data):
    """Stage 1 with switches skipping blocks, stage 2, stage 3. Stage 1 trains no epoch: its switches keep
    their data-dependent start, which sends about half the images through each block (trained, the
    switches of a net this small may end up executing every block, and then row 2 could not tell)."""
    results = tmp_path_factory.mktemp("chain") / "results"
    stage1(results, data, "--epochs", "0")
    main_prune.main(["--config_path", prune_config(results.parent / "prune.json", results, data)])
    main_rl_prune.main([*TINY, "--epochs", "1", "--lr", "0.01", "--data_dir", data, "--result_dir", str(results)])
    return results


def read(results, stage):
    return json.load(open(results / stage / "metrics.json"))


def test_row2_is_the_pruned_network_with_every_block(chain):
    sp, prune = read(chain, "sp"), read(chain, "prune")
    assert min(sp["exec_rate"]) < 1  # stage 1's switches skip: a routed row 2 would cost less than every block
    pruned = model_from_checkpoint(load_checkpoint(str(chain / "prune" / "checkpoint.pt")))
    every_block = dense_flops(measure_costs(pruned, SIZE)) / 1e9
    assert prune["mode"] == "open" and prune["gflops_per_image"] == pytest.approx(every_block, rel=1e-12)
    assert prune["dense_gflops"] == pytest.approx(every_block, rel=1e-12)
    assert {"routed_acc", "routed_gflops", "exec_rate"} <= set(prune)  # the routes' numbers beside it
    rows = {r["stage"]: r for r in build_table(str(chain))}
    assert rows["prune"]["gflops_per_image"] == prune["gflops_per_image"]
    assert rows["sp"]["gflops_per_image"] == pytest.approx(sp["dense_gflops"], rel=1e-12)


def test_every_stage_records_where_it_started(chain):
    sp, prune, rl = (read(chain, s) for s in ("sp", "prune", "rl"))
    assert sp["parent"] is None
    assert prune["parent"]["stage"] == "sp" and prune["parent"]["sha256"] == sp["checkpoint_sha256"]
    assert rl["parent"]["stage"] == "prune" and rl["parent"]["sha256"] == prune["checkpoint_sha256"]
    for stage, m in (("sp", sp), ("prune", prune), ("rl", rl)):
        assert file_sha256(chain / stage / "checkpoint.pt") == m["checkpoint_sha256"]
    # TensorBoard steps go on across stages: stage 1's 0 epochs, then stage 2's 1, then stage 3's 1
    assert (sp["tb_step"], prune["tb_step"], rl["tb_step"]) == (0, 1, 2)
    for stage in ("sp", "prune", "rl"):
        assert len(os.listdir(chain / stage / "tb")) == 1  # one run folder per run


def copy_results(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_rerun_is_refused_then_overwrite_moves_later_stages_aside(chain, data, tmp_path, capsys):
    results = copy_results(chain, tmp_path / "results")
    before = snapshot(results)
    with pytest.raises(UserError, match=r"later stages \(prune/, rl/\).*--overwrite"):
        stage1(results, data, "--depth", "14")
    assert snapshot(results) == before  # nothing touched
    with pytest.raises(UserError, match=r"later stages \(rl/\)"):
        main_prune.main(["--config_path", prune_config(tmp_path / "p.json", results, data)])
    assert snapshot(results) == before

    stage1(results, data, "--depth", "14", "--overwrite")
    aside = [d for d in os.listdir(results) if d.startswith("stale-")]
    assert len(aside) == 1
    assert sorted(os.listdir(results / aside[0])) == ["prune", "rl", "sp", "table.json", "table.md"]
    assert snapshot(results / aside[0]) == before  # the earlier run's whole chain, intact
    assert build_table(str(results / aside[0]))[2]["present"]  # and still a table
    rows = {r["stage"]: r for r in build_table(str(results))}
    assert rows["sp"]["present"] and not rows["prune"]["present"] and not rows["rl"]["present"]
    assert len(os.listdir(results / "sp" / "tb")) == 1  # the new run in a folder of its own


def test_overwrite_moves_all_or_nothing(chain, data, tmp_path, monkeypatch):
    results = copy_results(chain, tmp_path / "results")
    before = snapshot(results)
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "Permission denied", a))
                        if str(a).endswith("rl") else real(a, b))
    with pytest.raises(UserError, match=r"cannot move stale results .*Permission denied.*nothing was moved"):
        stage1(results, data, "--overwrite")
    assert snapshot(results) == before and not [d for d in os.listdir(results) if d.startswith("stale-")]


def test_a_checkpoint_from_another_folder_is_refused_before_any_work(chain, data, tmp_path):
    results = copy_results(chain, tmp_path / "results")
    other = tmp_path / "other"
    stage1(other, data, "--seed", "5", "--epochs", "0")
    before = snapshot(results)
    with pytest.raises(UserError, match=r"is not the stage 1 \(sp/\) network of .*another --result_dir"):
        main_prune.main(["--config_path", prune_config(tmp_path / "p.json", results, data,
                                                       checkpoint=str(other / "sp" / "checkpoint.pt"))])
    with pytest.raises(UserError, match=r"is not the stage 1 \(sp/\) network of"):
        main_rl_prune.main([*TINY, "--epochs", "1", "--data_dir", data, "--result_dir", str(results),
                            "--checkpoint", str(other / "sp" / "checkpoint.pt")])
    assert snapshot(results) == before
    # the folder's own network is welcome by path
    assert build_table(str(results))[2]["present"]


def test_a_stage_whose_parent_is_gone_is_orphaned(chain, tmp_path):
    import shutil
    results = copy_results(chain, tmp_path / "results")
    shutil.rmtree(results / "prune")
    with pytest.raises(UserError, match=r"stage 3 \(rl/\) is orphaned"):
        build_table(str(results))


@pytest.mark.slow
def test_table_of_a_run_ended_on_validation_and_of_foreign_metrics(chain, tmp_path):
    from helpers import assert_one_line_error, run_script
    from runtime.table import to_markdown
    results = copy_results(chain, tmp_path / "results")
    m = read(results, "rl")
    m.pop("test_acc")
    m.update(final_split="val", val_acc=50.0)
    (results / "rl" / "metrics.json").write_text(json.dumps(m))
    row = build_table(str(results))[2]
    assert row["accuracy"] is None and "val split" in row["note"]
    assert "| static + dynamic pruning | - |" in to_markdown(build_table(str(results)))
    del m["gflops_per_image"]
    (results / "rl" / "metrics.json").write_text(json.dumps(m))
    assert_one_line_error(run_script("-m", "runtime.table", str(results)), "no valid gflops_per_image")


def test_resume_refuses_changed_training_flags(chain, data, tmp_path):
    results = copy_results(chain, tmp_path / "results")
    before = snapshot(results)
    with pytest.raises(UserError, match=r"started with other training flags \(--lr 0.05 -> 0.5\)"):
        stage1(results, data, "--epochs", "0", "--lr", "0.5", "--resume")
    with pytest.raises(UserError, match=r"--bs 32 -> 16"):
        main_rl_prune.main([*TINY, "--epochs", "1", "--lr", "0.01", "--bs", "16", "--data_dir", data,
                            "--result_dir", str(results), "--resume"])
    with pytest.raises(UserError, match=r"--epochs 1 -> 0.*may only grow"):
        main_rl_prune.main([*TINY, "--epochs", "0", "--lr", "0.01", "--data_dir", data, "--result_dir",
                            str(results), "--resume"])
    assert snapshot(results) == before


def test_table_and_later_stages_refuse_a_broken_chain(chain, data, tmp_path):
    results = copy_results(chain, tmp_path / "results")
    other = tmp_path / "other"
    stage1(other, data, "--seed", "5")
    # stage 1 replaced behind the chain's back (another run's network and metrics copied in)
    for name in ("checkpoint.pt", "metrics.json"):
        (results / "sp" / name).write_bytes((other / "sp" / name).read_bytes())
    with pytest.raises(UserError, match=r"stage 2 \(prune/\) is stale"):
        build_table(str(results))
    with pytest.raises(UserError, match=r"stage 2 \(prune/\) is stale"):
        main_rl_prune.main([*TINY, "--epochs", "1", "--data_dir", data, "--result_dir", str(results)])
    # a stage-2 run resumed on top of another stage-1 network
    (results / "rl").rename(tmp_path / "rl-away")
    with pytest.raises(UserError, match=r"stage 1 was rerun since"):
        main_prune.main(["--config_path", prune_config(tmp_path / "p.json", results, data), "--resume"])
    # a checkpoint changed after its metrics were written (an interrupted rerun)
    results2 = copy_results(chain, tmp_path / "results2")
    (results2 / "prune" / "checkpoint.pt").write_bytes((chain / "sp" / "checkpoint.pt").read_bytes())
    with pytest.raises(UserError, match=r"stage 2 \(prune/\) is stale: its checkpoint.pt is not the network"):
        build_table(str(results2))


@pytest.mark.slow
def test_table_command_refuses_a_broken_chain_in_one_line(chain, data, tmp_path):
    from helpers import assert_one_line_error, run_script
    results = copy_results(chain, tmp_path / "results")
    (results / "prune" / "checkpoint.pt").write_bytes(b"not the network")
    assert_one_line_error(run_script("-m", "runtime.table", str(results)), "stage 2 (prune/) is stale")


@pytest.mark.slow
def test_stage1_printout_counts_on_and_names_what_it_evaluates(data, tmp_path, capsys):
    stage1(tmp_path / "r", data, "--epochs", "3", "--dense_epochs", "2")
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("[sp] epoch")]
    assert [l.split()[2] for l in lines] == ["1/3", "2/3", "3/3"]
    assert all("eval dense acc" in line for line in lines)  # row 1's network, every epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = os.listdir(tmp_path / "r" / "sp" / "tb")[0]
    acc = EventAccumulator(str(tmp_path / "r" / "sp" / "tb" / run))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "sp/test_dense/acc" in tags and "sp/test_routed/acc" in tags
    assert [e.step for e in acc.Scalars("sp/test_dense/acc")] == [1, 2, 3]  # dense evaluated every epoch
    assert [e.step for e in acc.Scalars("sp/test_routed/acc")] == [3]       # routed once the switches train
    assert [e.step for e in acc.Scalars("sp/final_test/test_acc")] == [3]   # final numbers at the last step


README_BLOCK = re.compile(r"## The three stages on CIFAR-100 \(GPU\).*?```\n(.*?)```", re.S)
SCALE = {"main_sp.py": ["--depth", "8", "--width", "1", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
                        "--bs", "32", "--lr", "0.05"],
         "main_prune.py": ["--device", "cpu", "--set", "epochs=1", "--set", "fisher_batches=2", "--set", "bs=32",
                           "--set", "num_workers=0", "--set", "compression=0.3"],
         "main_rl_prune.py": ["--depth", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu", "--bs", "32"]}


@pytest.mark.slow
def test_readme_gpu_commands_chain_when_copied(data, tmp_path, monkeypatch):
    """The README's three commands, verbatim but for the placeholders and flags of scale appended (the
    last of a repeated flag wins), run in order in one folder: each stage finds the one before it."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = README_BLOCK.search(text).group(1).replace("\\\n", " ").strip().splitlines()
    assert [shlex.split(c)[1] for c in commands] == ["main_sp.py", "main_prune.py", "main_rl_prune.py"]
    monkeypatch.chdir(ROOT)
    mains = {"main_sp.py": main_sp.main, "main_prune.py": main_prune.main, "main_rl_prune.py": main_rl_prune.main}
    for command in commands:
        argv = shlex.split(command.replace("RESULTS", str(tmp_path / "R")).replace("DATA", data))
        assert argv[0] == "python"
        mains[argv[1]]([*argv[2:], *SCALE[argv[1]]])
    rows = build_table(str(tmp_path / "R"))
    assert all(r["present"] for r in rows)


def test_a_stage_never_replaces_its_own_finished_run_without_overwrite(chain, data, tmp_path, capsys):
    """A second run into a folder holding a finished run of the same stage (no later stages there) is refused
    before anything is written, --epochs 0 too; --resume goes on, saying from where; --overwrite moves the finished run
    into stale-<time>/ (the rule and the folder aside of later stages). Stages 2 and 3 likewise."""
    results = tmp_path / "results"
    stage1(results, data, "--epochs", "1")
    before = snapshot(results)
    for extra in ((), ("--epochs", "0"), ("--seed", "3")):
        with pytest.raises(UserError, match=r"holds a finished stage 1 \(sp/\) run .*--overwrite"):
            stage1(results, data, *extra)
    assert snapshot(results) == before
    capsys.readouterr()
    stage1(results, data, "--epochs", "2", "--resume")  # the finished run goes on to more epochs
    assert "[sp] resuming from epoch 1\n" in capsys.readouterr().out
    finished = snapshot(results / "sp")
    stage1(results, data, "--overwrite")
    aside = [d for d in os.listdir(results) if d.startswith("stale-")]
    assert len(aside) == 1 and snapshot(results / aside[0] / "sp") == finished
    assert read(results, "sp")["run_id"] != json.load(open(results / aside[0] / "sp" / "metrics.json"))["run_id"]

    # --epochs 0 into a fresh folder: allowed, and said to train nothing
    stage1(tmp_path / "fresh", data, "--epochs", "0")
    assert "warning: --epochs 0 trains nothing" in capsys.readouterr().err

    # stage 3, then stage 2 (its stage-3 results gone), of a whole chain
    res = copy_results(chain, tmp_path / "chain")
    before = snapshot(res)
    rl = [*TINY, "--epochs", "1", "--lr", "0.01", "--data_dir", data, "--result_dir", str(res)]
    with pytest.raises(UserError, match=r"holds a finished stage 3 \(rl/\) run .*--overwrite"):
        main_rl_prune.main(rl)
    assert snapshot(res) == before
    for name in ("rl", "table.md", "table.json"):
        os.rename(res / name, tmp_path / name)
    before = snapshot(res)
    with pytest.raises(UserError, match=r"holds a finished stage 2 \(prune/\) run .*--overwrite"):
        main_prune.main(["--config_path", prune_config(tmp_path / "p.json", res, data)])
    assert snapshot(res) == before


@pytest.mark.slow
def test_tensorboard_curves_say_what_they_are_in_one_unit_each(data, tmp_path, capsys):
    """The curves of a three-stage run (event files read back): accuracies in percent (the summary lines'
    numbers), the loss a user watches is the cross-entropy that trains the network, the switches' own loss
    under its own tag, stage 3's curves those docs/stages.md names, stage 1's final routes named as the
    re-spread switches' (after the curve of the routes trained before), and no series that is constant by
    construction (every block's execution rates and GFLOPs, image counts, alpha with no target)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curves(results, stage):
        (run,) = os.listdir(results / stage / "tb")
        acc = EventAccumulator(str(results / stage / "tb" / run), size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}

    res = tmp_path / "r"
    stage1(res, data, "--epochs", "3", "--dense_epochs", "1")  # a dense epoch, two joint ones, the re-spread
    main_prune.main(["--config_path", prune_config(tmp_path / "p.json", res, data)])
    target = copy_results(res, tmp_path / "target")
    main_rl_prune.main([*TINY, "--epochs", "2", "--lr", "0.01", "--data_dir", data, "--result_dir", str(res)])
    out = capsys.readouterr().out
    dense = read(target, "prune")["dense_gflops"]
    main_rl_prune.main([*TINY, "--epochs", "2", "--lr", "0.01", "--data_dir", data, "--result_dir", str(target),
                        "--target_gflops", str(round(0.8 * dense, 6))])
    tags = {stage: curves(res, stage) for stage in ("sp", "prune", "rl")}

    # one unit per kind: the training accuracy in percent, as the summary line prints it and as evaluations are
    summaries = re.findall(r"\[(\w+)\] epoch (\d+)/\d+  train loss ([\d.]+) acc ([\d.]+)%", out)
    assert len(summaries) == 3 + 1 + 2
    for stage, epoch, loss, acc in summaries:
        step = sorted(tags[stage][f"{stage}/train/acc"])[int(epoch) - 1]  # the stage's epochs, in order
        assert tags[stage][f"{stage}/train/acc"][step] == pytest.approx(float(acc), abs=0.006)
        assert tags[stage][f"{stage}/train/loss"][step] == pytest.approx(float(loss), abs=6e-4)
    # stage 3's loss is the cross-entropy (the backbone's), its switch loss on a tag of its own
    rl = tags["rl"]
    assert {"rl/train/loss", "rl/train/acc", "rl/train/switch_loss", "rl/train/benefit/switch_01",
            "rl/train/exec_target/switch_01", "rl/train/sampled_gflops", "rl/train/greedy_gflops"} <= set(rl)
    assert "rl/train/ce" not in rl and max(rl["rl/train/loss"].values()) < 2 * math.log(4)  # a 4-class CE
    # stage 1's final routes are the re-spread switches', named so
    sp = tags["sp"]
    assert {"sp/final_test/respread_routed_acc", "sp/final_test/respread_routed_gflops"} <= set(sp)
    assert "sp/final_test/routed_acc" not in sp and read(res, "sp")["switches_respread"] is True
    # no series constant by construction
    constant = [t for stage in tags.values() for t in stage
                if re.search(r"_dense/(exec_rate|gflops)|/images$|^prune/.*exec_rate|^rl/train/alpha", t)]
    assert constant == []
    assert sorted(sp["sp/train/exec_rate/switch_01"]) == [2, 3]  # not in the dense epoch
    alpha = curves(target, "rl")["rl/train/alpha"]  # with a target alpha moves, and its curve is there
    assert len(alpha) == 2 and len(set(alpha.values())) == 2
