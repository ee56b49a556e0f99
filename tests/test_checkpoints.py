"""What a checkpoint holds for later use: the input pipeline, recorded by stage 1 and inherited by stages 2
and 3, and load_model's network and preprocessing that score the raw test images as the stage reported."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_script
from models import build_model, make_arch
from utils.errors import UserError


def test_every_checkpoint_records_the_pipeline_later_stages_inherit_it(pipeline):
    tmp, data, res = pipeline
    records = [torch.load(res / s / "checkpoint.pt", weights_only=True)["pipeline"] for s in ("sp", "prune", "rl")]
    assert records[0]["resize"] == 16 and records[0]["augment"] == "cifar"
    assert records[0]["classes"] == sorted(os.listdir(os.path.join(data, "train")))
    assert len(records[0]["mean"]) == len(records[0]["std"]) == 3 and min(records[0]["std"]) > 0
    assert records[1] == records[0] and records[2] == records[0]  # stages 2 and 3 used stage 1's


@pytest.mark.parametrize("stage", ["sp", "prune", "rl"])
def test_model_from_checkpoint_works_on_raw_images_without_the_training_set(pipeline, stage):
    """load_model gives the network of its stage's table row and its preprocessing: on the raw test PNGs it
    scores what the tool reported, with no statistics recomputed. Stages 1 and 2: every block, no switch
    (the rows "w/o pruning" and "static pruning only", metrics' test_acc); their switches' routes (routed_acc)
    are one argument away. Stage 3: the routes (its row), every block one argument away."""
    from runtime.checkpoint import load_model
    tmp, data, res = pipeline
    path = str(res / stage / "checkpoint.pt")
    model, preprocess = load_model(path)
    test_dir = os.path.join(data, "test")
    files = [(os.path.join(test_dir, c, f), preprocess.classes.index(c))
             for c in sorted(os.listdir(test_dir)) for f in sorted(os.listdir(os.path.join(test_dir, c)))]
    x, y = preprocess([f for f, _ in files]), torch.tensor([y for _, y in files])
    metrics = json.load(open(res / stage / "metrics.json"))
    row = {r["stage"]: r for r in json.load(open(res / "table.json"))["rows"]}[stage]

    def run(net, mode=None):
        with torch.no_grad():
            logits, routes, _ = net(x, mode)
        return logits, routes, 100 * (logits.argmax(1) == y).double().mean().item()
    logits, routes, acc = run(model)
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-9) and acc == pytest.approx(row["accuracy"], abs=1e-9)
    other, _ = load_model(path, mode="hard" if stage != "rl" else "open")
    if stage == "rl":
        assert model.mode == "hard" and torch.equal(logits, run(model, "hard")[0])  # the row's routes
        assert run(other)[1].all()  # every block, one argument away
    else:
        assert model.mode == "open" and routes.all()  # every block, no switch
        assert torch.equal(logits, run(model, "open")[0])
        assert run(other)[2] == pytest.approx(metrics["routed_acc"], abs=1e-9)  # the routes beside the row
        assert not run(other)[1].all()
    with pytest.raises(Exception, match="mode 'greedy'"):
        load_model(path, mode="greedy")
    from PIL import Image  # a single image as an array, as a user might hold it
    x = preprocess(np.asarray(Image.open(files[0][0])))
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_results_are_written_with_the_users_umask(tmp_path, umask):
    """Every result file (checkpoint, metrics.json, table.md and table.json) gets the mode a plain open()
    gives under the user's umask, as TensorBoard's files and exports do: on a shared cluster a colleague in
    the group reads them where the umask lets them (0o022: everyone; 0o027: the group)."""
    from runtime.checkpoint import save_checkpoint
    from runtime.table import save_table
    from utils.files import write_json
    before = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "sp" / "checkpoint.pt"), {"stage": "sp", "model": {"w": torch.ones(2)}})
        write_json(str(tmp_path / "sp" / "metrics.json"), {"test_acc": 1.0})
        save_table(str(tmp_path), "| a |\n", [])
        with open(tmp_path / "plain.txt", "w") as f:  # what the umask gives any file
            f.write("x")
    finally:
        os.umask(before)
    want = 0o666 & ~umask
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777
             for name in ("sp/checkpoint.pt", "sp/metrics.json", "table.md", "table.json", "plain.txt")}
    assert modes == dict.fromkeys(modes, want), {k: oct(v) for k, v in modes.items()}


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
    """A checkpoint of the project's earlier format (dynprune-checkpoint/1, whose files may lack what this
    version reads) is refused, never read with guesses: one line naming the file, its format and the stage
    to rerun, exit status 2; as a stage's input and as --pretrained alike."""
    from runtime.checkpoint import load_checkpoint, load_pretrained
    model = build_model(make_arch(depth=8, width=1, num_classes=10))
    path = str(tmp_path / "old.pt")
    torch.save({"format": "dynprune-checkpoint/1", "stage": "prune", "arch": model.arch,
                "model": model.state_dict(), "epoch": 0}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path, ("prune", "sp"))
    for words in (path, "'dynprune-checkpoint/1'", "rerun main_prune.py"):
        assert words in str(e.value), str(e.value)
    with pytest.raises(UserError, match="another version of this project"):
        load_pretrained(model, path)
    proc = run_script("main_rl_prune.py", "--checkpoint", path, "--result_dir", str(tmp_path / "results"),
                      "--data_dir", str(tmp_path), "--device", "cpu")
    assert_one_line_error(proc, path, "dynprune-checkpoint/1", "rerun main_prune.py")
    assert not (tmp_path / "results").exists()
