"""Smoke test of the study (bench/study.py --quick): the three stage scripts run as subprocesses on a tiny
synthetic dataset, the sweep, and (where bench/requirements.txt is installed) the Torch-Pruning peer and
the picture, so the study's code path cannot rot. The real study uses scikit-learn's digits instead."""
import importlib
import json
import os

from bench import study


def installed(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def test_quick_study_runs_every_stage_and_writes_the_results(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    summary = study.main(["--quick", "--out", str(out), "--results", str(results)])

    # the three stages ran through their own entry points, and the table is theirs
    scripts = {name: cmd[1] for name, cmd in summary["commands"].items()}
    assert scripts["sp/seed0"] == "main_sp.py" and scripts["rl/seed0"] == "main_rl_prune.py"
    assert summary["commands"]["prune/seed0"][1:3] == ["main_prune.py", "--config_path"]
    # the table's static + dynamic setting is main_search.py's choice, and its wall time is reported
    assert scripts["search/seed0"] == "main_search.py" and summary["timing"]["search_seconds"]["search/seed0"] > 0
    assert summary["search_settings"][0] and (out / "seed0" / "search" / "pareto.png").is_file()
    for stage in ("sp", "prune", "rl"):
        assert (out / "seed0" / stage / "checkpoint.pt").is_file()
    rows = summary["table"]
    assert [r["stage"] for r in rows] == ["sp", "prune", "rl"]
    assert abs(rows[1]["compression"]["mean"] - study.SCALES["quick"]["main_compression"]) <= 0.011
    assert rows[2]["gflops_per_image"]["mean"] <= rows[1]["gflops_per_image"]["mean"] + 1e-12

    # every point of the picture is a run with its metrics file
    points = json.loads((results / "study_points.json").read_text())["points"]
    scale = study.SCALES["quick"]
    assert sum(p["kind"] == "static+dynamic" for p in points) == \
        len(scale["sweep_compressions"]) * len(scale["sweep_alphas"])
    for p in points:
        assert os.path.isfile(p["source"]) or os.path.isfile(os.path.join(study.ROOT, p["source"]))
    assert "| static + dynamic pruning |" in (results / "study.md").read_text()
    assert (results / "study.png").is_file() == installed("matplotlib")

    if installed("torch_pruning"):
        models = summary["comparison"]["models"]
        ours = models["ours_static"]["params"]
        for key in ("tp_magnitude", "tp_taylor"):
            assert abs(models[key]["params"] - ours) <= 0.05 * ours  # pruned to our parameter count
            assert models[key]["latency_ms_b1"] > 0 and models[key]["latency_ms_b128"] > 0
    else:
        assert summary["comparison"] is None

    # a second call finds every task done by the same command and only re-aggregates
    again = study.main(["--quick", "--out", str(out), "--results", str(results)])
    assert sorted(again["tasks_reused"]) == sorted(summary["commands"])
