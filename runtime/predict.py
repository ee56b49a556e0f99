"""The one per-image evaluator: a checkpoint with the data and FLOPs costs it is evaluated with (load), and
what a network does to each image of a loader, in order (predict): logits, route and the FLOPs that route
executes. runtime/evaluate.py's `evaluate` is the summed form the stages report."""
import contextlib
from dataclasses import dataclass

import torch

from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from runtime.evaluate import no_autotune_when_skipping
from runtime.loop import prepare
from utils.data import load_data
from utils.flops import measure_costs, skipped_flops


EVALUATED = ("resize", "mean", "std", "classes")  # what an evaluation's images depend on (not augmentation)


@dataclass
class Loaded:
    ckpt: dict
    model: torch.nn.Module  # the plain module (FLOPs, state dict)
    ddp: torch.nn.Module    # what to call: the model, or its DDP wrapper under torchrun
    data: object            # utils.data.Data: the loaders, the recorded pipeline
    costs: dict             # utils.flops.measure_costs at the recorded input size


def load(path, settings, ctx, stages=None, flag="checkpoint", data=None):
    """A checkpoint of `stages` (None: any), its network prepared for ctx, the data of `settings` through its
    recorded pipeline (`data` reused where that gives the same images), and its FLOPs costs; errors in one line."""
    ckpt = load_checkpoint(path, stages, flag)
    recorded = ckpt.get("pipeline")
    if data is None or recorded is None or any(data.pipeline[k] != recorded[k] for k in EVALUATED):
        data = load_data(settings, ctx, recorded=recorded, source=f"{flag} {path}")
    model, ddp = prepare(model_from_checkpoint(ckpt, path, flag), ctx)
    return Loaded(ckpt, model, ddp, data, measure_costs(model, data.image_size))


def checkpoint_costs(path, stages=None, flag="checkpoint"):
    """The FLOPs costs (utils.flops.measure_costs) of a checkpoint's network at its recorded input size."""
    ckpt = load_checkpoint(path, stages, flag)
    return measure_costs(model_from_checkpoint(ckpt, path, flag), ckpt["pipeline"]["resize"])


def image_flops(costs, routes, mode="hard"):
    """FLOPs each image executes, float64 (N,), from its 0/1 route (N, S); the switches too, but in "open" mode."""
    blocks = torch.tensor(costs["blocks"], dtype=torch.float64)
    base = costs["base"] if mode == "open" else skipped_flops(costs)
    return base + routes.detach().cpu().to(torch.float64) @ blocks


@contextlib.contextmanager
def fixed_route(model, route):
    """The model runs `route` (0/1 per gated block; None: every block) in "open" mode inside."""
    model = getattr(model, "module", model)
    saved, model.route = model.route, None if route is None else list(route)
    try:
        yield model
    finally:
        model.route = saved


@dataclass
class Predictions:
    logits: torch.Tensor    # (N, classes) float32
    labels: torch.Tensor    # (N,)
    routes: torch.Tensor    # (N, S) int8: 1 where the image ran the gated block
    probs: torch.Tensor     # (N, S) the switches' probabilities of running each block ("hard" mode)
    flops: torch.Tensor     # (N,) float64, or None without costs

    @property
    def correct(self):
        return self.logits.argmax(1) == self.labels


@torch.no_grad()
def predict(ddp, loader, costs=None, mode="hard", route=None):
    """Every image of `loader` through the network, in order, onto the CPU; each process its own images (no
    collective). `mode` "hard": greedy routes; "open": every block, or `route` for every image. No autocast."""
    out = {"logits": [], "labels": [], "routes": [], "probs": []}
    with fixed_route(ddp, route) as model, no_autotune_when_skipping(model.eval(), mode):
        for x, y in loader:
            logits, routes, probs = model(x, mode)
            out["logits"].append(logits.float().cpu())
            out["labels"].append(y.cpu())
            out["routes"].append(routes.cpu().to(torch.int8))
            out["probs"].append(probs.float().cpu())
    got = {k: torch.cat(v) for k, v in out.items()}
    return Predictions(flops=None if costs is None else image_flops(costs, got["routes"], mode), **got)


def file_batches(preprocess, paths, class_names, bs, device="cpu"):
    """(x, y) batches of image files through `preprocess` (load_model's), labelled by class name."""
    for i in range(0, len(paths), bs):
        y = torch.tensor([preprocess.classes.index(c) for c in class_names[i:i + bs]], device=device)
        yield preprocess(paths[i:i + bs], device), y
