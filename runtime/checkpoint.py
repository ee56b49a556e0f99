"""One checkpoint format for all three stages: a dict of plain data and tensors, written atomically and
loaded with weights_only=True (a checkpoint never runs code). What every stage writes (stage_checkpoint):

    {"format": FORMAT, "stage": "sp" | "prune" | "rl",
     "pipeline": {"resize", "mean", "std", "classes", "augment"} (utils.data.make_pipeline),
     "run_id", "parent" (utils/lineage.py's record of the checkpoint the stage started from),
     "step_offset", "tb_step" (TensorBoard steps: runtime/stage.py),
     "arch": {...plain architecture...}, "model": state_dict, "optimizer": ..., "scheduler": ... or None,
     "epoch": epochs done, "rng": {"torch", "cuda" where there is CUDA},
     "world_size": the number of processes training it (torchrun's; --resume must have as many)}

and beside them the stage's own keys:

    sp     "args" (its flags), "switches_respread"
    prune  "round", "history" (each round's report), "schedule", "config" (the resolved config),
           "params_stage1", "stage1_checkpoint"
    rl     "args" (its flags), "extra": {"baseline", "price", "source", "ending"}
"""
import os
import re

import torch

from models import build_model, check_arch
from utils.data import Preprocess, check_pipeline
from utils.errors import UserError
from utils.files import atomic_write
from utils.lineage import STAGES
from utils.nets import SWITCHES

FORMAT = "dynprune-checkpoint/2"  # a file of another version is refused (check_format), never converted
TMP_PREFIX = ".tmp-checkpoint-"


def save_checkpoint(path, payload):
    """Atomic: a process killed while writing leaves the previous checkpoint; an OSError is a UserError."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f), binary=True, tmp_prefix=TMP_PREFIX)


def stage_checkpoint(stage, pipeline, lineage, model, optimizer, scheduler, epoch, own):
    """The checkpoint dict of a stage (the format above, less the marker save_checkpoint adds); pipeline None:
    not recorded; `own`: the stage's own keys."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"stage": stage, **({"pipeline": pipeline} if pipeline is not None else {}), **lineage,
            "arch": model.arch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None, "epoch": epoch, "rng": rng, **own}


def read_file(path, flag, resave=None):
    """torch.load(weights_only=True), every failure one line naming the file: a file that would need code run
    is refused naming the first such type (and `resave`, how to write a usable one)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, foreign pickles: all the same user error
        if "GLOBAL" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"a {found.group(1)} object" if found else "objects other than tensors and plain data"
            raise UserError(f"{flag} {path}: refused, it holds {what} (loading anything but tensors and plain data "
                            f"could run code)" + (f"; {resave}" if resave else "")) from None
        why = "truncated or corrupt" if "zip" in str(e).lower() or isinstance(e, EOFError) else "not a torch file"
        raise UserError(f"{flag} {path}: not a readable checkpoint ({why})") from None


def is_project_file(ckpt):
    """Whether `ckpt` (what torch.load read) is a checkpoint of this project, of any format version."""
    return isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith(FORMAT.split("/")[0] + "/")


def check_format(ckpt, path, flag):
    """UserError unless `ckpt` is a checkpoint of this project in this version's format."""
    if not is_project_file(ckpt):
        raise UserError(f"{flag} {path}: not a checkpoint of this project (no '{FORMAT}' marker)")
    if ckpt["format"] != FORMAT:
        stage = STAGES.get(ckpt.get("stage"))
        rerun = f"rerun {stage.script}" if stage else "rerun the stage that wrote it"
        raise UserError(f"{flag} {path}: a checkpoint of another version of this project (format "
                        f"'{ckpt['format']}', this version reads '{FORMAT}'); {rerun} with this version")


def load_checkpoint(path, stages=None, flag="--checkpoint"):
    """Load and check a checkpoint of one of `stages` (None: any); every problem one line naming the file."""
    ckpt = read_file(path, flag)
    check_format(ckpt, path, flag)
    if stages and ckpt.get("stage") not in stages:
        wanted = " or ".join(STAGES[s].writer for s in stages)
        got = STAGES[ckpt["stage"]].writer if ckpt.get("stage") in STAGES else repr(ckpt.get("stage"))
        raise UserError(f"{flag} {path}: written by {got}, expected one from {wanted}")
    try:
        check_arch(ckpt.get("arch"))
    except UserError as e:
        raise UserError(f"{flag} {path}: bad architecture description ({e})") from None
    if isinstance(ckpt.get("model"), dict):
        check_finite(ckpt["model"], path, flag)
    if "pipeline" in ckpt:
        check_pipeline(ckpt["pipeline"], f"{flag} {path}")
    return ckpt


def check_finite(state, path, flag):
    """UserError if a float tensor of the state dict holds NaN or inf (later steps would show only symptoms)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{flag} {path}: its weights hold NaN or inf ({bad[0]}"
                        + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "") + "); refused")


def weight_mismatches(own, state, may_miss=()):
    """What keeps `state` from loading into state dict `own` (`may_miss`: prefixes that may be absent)."""
    return ([f"missing {k}" for k in own if k not in state and not any(k.startswith(p) for p in may_miss)]
            + [f"unexpected {k}" for k in state if k not in own]
            + [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}" for k in state
               if k in own and getattr(state[k], "shape", None) != own[k].shape])


def model_from_checkpoint(ckpt, path="checkpoint", flag="--checkpoint"):
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    model = build_model(ckpt["arch"])
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path}: holds no weights")
    problems = weight_mismatches(model.state_dict(), state)
    if problems:
        raise UserError(f"{flag} {path}: weights do not match its architecture ({problems[0]}; "
                        f"{len(problems)} problems)")
    model.load_state_dict(state)
    return model


def load_pretrained(model, path, flag="--pretrained"):
    """Initialise `model` from a checkpoint or a plain state dict of the same network (switches may be absent)."""
    state = read_file(path, flag, resave="save the weights alone, torch.save(model.state_dict(), 'weights.pt'), and "
                                          "give that file")
    if is_project_file(state):
        check_format(state, path, flag)
        state = state.get("model")
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path}: holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    problems = weight_mismatches(model.state_dict(), state, may_miss=(SWITCHES,))
    if problems:
        raise UserError(f"{flag} {path}: weights do not fit this network ({problems[0]}; {len(problems)} problems)")
    check_finite(state, path, flag)
    model.load_state_dict(state, strict=False)


def row_mode(ckpt):
    """The mode of a stage's table row: stage 3's routes ("hard"), every block for stages 1 and 2 ("open")."""
    return "hard" if ckpt.get("stage") == "rl" else "open"


def load_model(path, device="cpu", mode=None):
    """(model, preprocess) of a checkpoint of any stage for raw 8-bit images: `logits, routes, probs =
    model(preprocess(images))`, in eval mode, its table row's network (row_mode) or `mode` ("open", "hard")."""
    if mode not in (None, "open", "hard"):
        raise UserError(f"mode {mode!r}: expected 'open' (every block, no switch) or 'hard' (the switches' routes)")
    ckpt = load_checkpoint(path, flag="checkpoint")
    if "pipeline" not in ckpt:
        raise UserError(f"checkpoint {path}: records no input pipeline; its normalisation is unknown")
    model = model_from_checkpoint(ckpt, path, "checkpoint").to(device).eval()
    model.mode = mode or row_mode(ckpt)
    return model, Preprocess(ckpt["pipeline"], f"checkpoint {path}")
