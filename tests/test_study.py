"""Smoke test of the study (python -m evaluation.study --quick): every script of the study runs as a subprocess
on a tiny synthetic dataset (stage 1 with a dense start and plainly dense, the search, its setting applied to a second
seed, stage 3 at the seed's flags, static pruning pushed to equal GFLOPs, the best fixed route) and the
results and picture are written, so the study's code path cannot rot. The real study uses scikit-learn's
digits instead."""
import importlib
import json

import pytest

from evaluation import study


def installed(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_quick_study_runs_every_part_and_writes_the_results(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    summary = study.main(["--quick", "--out", str(out), "--results", str(results)])

    scripts = {name: cmd[1] for name, cmd in summary["commands"].items()}
    assert scripts["sp/seed0"] == scripts["dense/seed1"] == "main_sp.py"
    assert "--dense_epochs" in summary["commands"]["sp/seed0"]
    dense = summary["commands"]["dense/seed0"]
    assert dense[dense.index("--train_mode") + 1] == "open"
    assert scripts["search/seed0"] == "main_search.py" and summary["timing"]["search_seconds"]["search/seed0"] > 0
    assert summary["commands"]["route/seed1"][1:3] == ["-m", "evaluation.fixed_route"]
    # the search's setting (chosen on validation) is what the second seed's stage 3 ran with
    # (a GFLOPs target: at the same place between the seed's static network with every gated block skipped
    # and with all run)
    chosen = summary["search_settings"]["chosen"]
    rl = summary["commands"]["rl/seed1"]
    low, high = study.gflops_range(study.SCALES["quick"], str(out / "seed1" / "prune" / "checkpoint.pt"))
    assert 0 < chosen["fraction"] < 1
    assert float(rl[rl.index("--target_gflops") + 1]) == pytest.approx(low + chosen["fraction"] * (high - low),
                                                                      abs=1e-6)
    flags = summary["commands"]["seedflags/seed0"]
    assert [flags[flags.index(f) + 1] for f in ("--alpha", "--rl_weight", "--lr")] == ["0.1", "0.1", "0.001"]
    # static pushed to the per-image network's GFLOPs: its stage-2 config has the gflops target
    equal = summary["stage2_configs"]["equal/seed1"]
    assert "gflops" in equal and "compression" not in equal

    for r in summary["per_seed"]:
        assert r["dense"]["test_acc"] is not None and r["static"] and r["dynamic"] and r["static_equal"]
        assert r["dynamic"]["gflops_per_image"] <= r["static"]["gflops_per_image"] + 1e-12
        for route in r["route_stage3_weights"].values():
            assert route is None or route["gflops_per_image"] > 0
        assert r["route_stage3_weights"]["at_or_under"]["gflops_per_image"] <= \
            r["dynamic"]["gflops_per_image"] + 1e-6
    assert summary["seed_flags"]["before"]["exec_rate"] and summary["seed_flags"]["after"]["exec_rate"]
    text = (results / "study.md").read_text()
    assert "Row 1 against plain dense training" in text and "At equal GFLOPs" in text
    assert "then --train_mode joint" in text  # the set-up paragraph names the stage-1 mode that ran
    assert json.loads((results / "study_points.json").read_text())["points"]
    assert (results / "study.png").is_file() == installed("matplotlib")

    # a second call finds every task done by the same command and only re-aggregates
    again = study.main(["--quick", "--out", str(out), "--results", str(results)])
    assert sorted(again["tasks_reused"]) == sorted(summary["commands"])


def test_stage1_names_its_mode_so_runs_under_another_default_are_not_reused():
    """Row 1's command names --train_mode (the runner reuses a task while its command is the same, so a
    command left to main_sp.py's default would reuse stage-1 runs made when that default was another mode)."""
    for name, s in study.SCALES.items():
        cmd = study.sp_command(s, "data", "run", 0)
        assert cmd[cmd.index("--train_mode") + 1] == "joint", name
        assert cmd[cmd.index("--dense_epochs") + 1] == str(s["sp"]["dense_epochs"]), name
        dense = study.sp_command(s, "data", "run", 0, dense=True)
        assert dense[dense.index("--train_mode") + 1] == "open" and "--dense_epochs" not in dense, name


def test_bad_flags_and_another_scales_out_are_refused(tmp_path):
    """One line each, before any data is written; an --out holding another scale's data is never reused."""
    from utils.errors import UserError
    for argv, words in [(["--quick", "--mixed"], "two scales"), (["--quick", "--jobs", "0"], "--jobs 0")]:
        with pytest.raises(UserError, match=words):
            study.main([*argv, "--out", str(tmp_path / "none"), "--results", str(tmp_path / "res")])
    assert not (tmp_path / "none").exists()
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data_kind.txt").write_text("digits")
    with pytest.raises(UserError, match="'digits' data, not 'synthetic'"):
        study.main(["--quick", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()
