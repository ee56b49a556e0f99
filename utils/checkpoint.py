"""One checkpoint format for all three stages: a dict of plain data and tensors, written atomically and
loaded with weights_only=True (a checkpoint never runs code).

    {"format": FORMAT, "stage": "sp" | "prune" | "rl", "arch": {...plain architecture...},
     "model": state_dict, "epoch": epochs done, "optimizer": ..., "scheduler": ..., "rng": ...,
     "metrics": {...}, "extra": {...stage-specific plain data...}}
"""
import os
import pickle
import tempfile
import zipfile

import torch

from models import build_model, check_arch
from utils.errors import UserError

FORMAT = "dynprune-checkpoint/1"
TMP_PREFIX = ".tmp-checkpoint-"
STAGE_NAMES = {"sp": "stage 1 (main_sp.py)", "prune": "stage 2 (main_prune.py)",
               "rl": "stage 3 (main_rl_prune.py)"}


def save_checkpoint(path, payload):
    """Write to a temporary file beside `path`, flush it to disk, then rename: a process killed while
    writing leaves the previous checkpoint in place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for stale in os.listdir(directory):  # left by a process killed while writing (one writer per folder)
        if stale.startswith(TMP_PREFIX):
            os.unlink(os.path.join(directory, stale))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, stages=None, flag="--checkpoint"):
    """Load and check a checkpoint; every problem is a one-line UserError that names the file.
    `stages`: the stages whose checkpoints are acceptable here."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{flag} {path}: refused, it holds objects other than tensors and plain data "
                            f"(loading it could run code)") from None
        raise UserError(f"{flag} {path}: not a readable checkpoint ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError) as e:
        reason = "truncated or corrupt" if "zip" in str(e).lower() or isinstance(e, EOFError) else \
            (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{flag} {path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a checkpoint of this project (no '{FORMAT}' marker)")
    if stages and ckpt.get("stage") not in stages:
        wanted = " or ".join(STAGE_NAMES[s] for s in stages)
        got = STAGE_NAMES.get(ckpt.get("stage"), repr(ckpt.get("stage")))
        raise UserError(f"{flag} {path}: written by {got}, expected one from {wanted}")
    try:
        check_arch(ckpt.get("arch"))
    except UserError as e:
        raise UserError(f"{flag} {path}: bad architecture description ({e})") from None
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint", flag="--checkpoint"):
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    model = build_model(ckpt["arch"])
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {path}: weights do not match its architecture ({first})") from None
    return model


def load_pretrained(model, path, flag="--pretrained"):
    """Initialise `model` from a checkpoint of this project or from a plain state dict of the same network.
    Switch weights may be absent (a dense network's checkpoint); everything else must match."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # every way a foreign or broken file fails to unpickle is the same user error
        refused = "weights_only" in str(e) or "Unsupported global" in str(e)
        raise UserError(f"{flag} {path}: " + ("refused, it holds objects other than tensors and plain data"
                        if refused else "not a readable checkpoint (truncated or corrupt)")) from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        state = state.get("model")
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path}: holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("switches.")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise UserError(f"{flag} {path}: weights do not fit this network ({what})")
    model.load_state_dict(state, strict=False)
