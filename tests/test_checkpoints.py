"""What a checkpoint holds for later use: the input pipeline, recorded by stage 1 and inherited by stages 2
and 3, and load_model's network and preprocessing that score the raw test images as the stage reported."""
import json
import os

import numpy as np
import pytest
import torch


def test_every_checkpoint_records_the_pipeline_later_stages_inherit_it(pipeline):
    tmp, data, res = pipeline
    records = [torch.load(res / s / "checkpoint.pt", weights_only=True)["pipeline"] for s in ("sp", "prune", "rl")]
    assert records[0]["resize"] == 16 and records[0]["augment"] == "cifar"
    assert records[0]["classes"] == sorted(os.listdir(os.path.join(data, "train")))
    assert len(records[0]["mean"]) == len(records[0]["std"]) == 3 and min(records[0]["std"]) > 0
    assert records[1] == records[0] and records[2] == records[0]  # stages 2 and 3 used stage 1's


@pytest.mark.parametrize("stage", ["sp", "rl"])
def test_model_from_checkpoint_works_on_raw_images_without_the_training_set(pipeline, stage):
    """load_model gives the network and its preprocessing: on the raw test PNGs it scores what the tool
    reported, with no statistics recomputed. Each number as its stage defines it: stage 1's test_acc is the
    dense network's (open mode, every block) and routed_acc its switches' routes; later stages' test_acc is
    the routed network's (the model's own mode)."""
    from runtime.checkpoint import load_model
    tmp, data, res = pipeline
    model, preprocess = load_model(str(res / stage / "checkpoint.pt"))
    test_dir = os.path.join(data, "test")
    files = [(os.path.join(test_dir, c, f), preprocess.classes.index(c))
             for c in sorted(os.listdir(test_dir)) for f in sorted(os.listdir(os.path.join(test_dir, c)))]
    x, y = preprocess([f for f, _ in files]), torch.tensor([y for _, y in files])
    metrics = json.load(open(res / stage / "metrics.json"))

    def accuracy(mode=None):
        with torch.no_grad():
            logits, _, _ = model(x, mode)
        return 100 * (logits.argmax(1) == y).double().mean().item()
    if stage == "sp":
        assert accuracy("open") == pytest.approx(metrics["test_acc"], abs=1e-9)
        assert accuracy() == pytest.approx(metrics["routed_acc"], abs=1e-9)
    else:
        assert accuracy() == pytest.approx(metrics["test_acc"], abs=1e-9)
    from PIL import Image  # a single image as an array, as a user might hold it
    x = preprocess(np.asarray(Image.open(files[0][0])))
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
