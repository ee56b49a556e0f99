"""Which network each stage started from (its `parent`: {"stage", "path", "sha256"}), so that a table row, a
later stage, the search or an export never combines one run's stage with another run's. The chain of a
--result_dir holds when each stage's parent is the final checkpoint of the stage before it there, and each
metrics.json describes the checkpoint beside it (its checkpoint_sha256)."""
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass

from utils.errors import UserError
from utils.files import read_json


@dataclass(frozen=True)
class Stage:
    """One of the three stages as every message, file and table names it: `name` its folder in --result_dir
    and its checkpoints' "stage", `method` its row of the table."""
    name: str
    number: int
    script: str
    method: str
    label = property(lambda self: f"stage {self.number} ({self.name}/)")
    writer = property(lambda self: f"stage {self.number} ({self.script})")


STAGES = {s.name: s for s in (Stage("sp", 1, "main_sp.py", "w/o pruning"),
                              Stage("prune", 2, "main_prune.py", "static pruning only"),
                              Stage("rl", 3, "main_rl_prune.py", "static + dynamic pruning"))}
ORDER = tuple(STAGES)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parent_record(stage, path):
    """The lineage record of a checkpoint a stage starts from."""
    return {"stage": stage, "path": os.path.abspath(path), "sha256": file_sha256(path)}


def read_metrics(result_dir, stage):
    """The metrics.json of `stage` in result_dir (a finished run's), or None if there is none."""
    path = os.path.join(result_dir, stage, "metrics.json")
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable or not JSON") from None


def check_chain(result_dir, stages=ORDER):
    """UserError naming the first broken link among `stages` of result_dir (none when the chain holds or is
    unrecorded)."""
    finished = {s: m for s in stages if (m := read_metrics(result_dir, s)) is not None}
    for stage, m in finished.items():
        ckpt, this = os.path.join(result_dir, stage, "checkpoint.pt"), STAGES[stage]
        own = m.get("checkpoint_sha256")
        if own and os.path.isfile(ckpt) and file_sha256(ckpt) != own:
            raise UserError(f"{result_dir}: {this.label} is stale: its checkpoint.pt is not the network its "
                            f"metrics.json describes (rerun or interrupted since; finish it with {this.script} "
                            f"--resume)")
    for stage, m in finished.items():
        parent, this = m.get("parent"), STAGES[stage]
        if not parent or not parent.get("sha256"):
            continue
        if parent.get("stage") not in finished:
            # the folder holds a stage before the parent and one after it, not the network between them
            if parent.get("stage") in ORDER and any(ORDER.index(s) < ORDER.index(parent["stage"]) for s in finished):
                up = STAGES[parent["stage"]]
                raise UserError(f"{result_dir}: {this.label} is orphaned: it started from a {up.label} network that "
                                f"is no longer in this folder (rerun {up.script} and {this.script})")
            continue
        up = finished[parent["stage"]].get("checkpoint_sha256")
        if up and up != parent["sha256"]:
            raise UserError(f"{result_dir}: {this.label} is stale: it started from another "
                            f"{STAGES[parent['stage']].label} network than the one there now (rerun {this.script}, "
                            f"or rerun the earlier stage with --overwrite to move it aside)")


def check_parent_fits(result_dir, parent, flag):
    """A parent given by `flag` must be the network result_dir holds of its stage, if any: else the folder
    would combine two runs."""
    stage = parent.get("stage")
    there = os.path.join(result_dir, stage, "checkpoint.pt") if stage in ORDER else None
    if there and os.path.isfile(there) and file_sha256(there) != parent["sha256"]:
        raise UserError(f"{flag} {parent['path']} is not the {STAGES[stage].label} network of {result_dir}: this "
                        f"stage's results would sit beside another run's; give another --result_dir (or the "
                        f"checkpoint that is there)")


def stale_folder(root, within=""):
    """A new <root>/stale-<time>[-n] to move stale results into (`within` it: one not holding that path yet)."""
    stamp = time.strftime("stale-%Y%m%d-%H%M%S")
    aside, n = os.path.join(root, stamp), 1
    while os.path.exists(os.path.join(aside, within)):
        aside, n = os.path.join(root, f"{stamp}-{n}"), n + 1
    return aside


def guard_rerun(result_dir, stage, overwrite, is_main=True, resuming=False):
    """Before a stage writes into result_dir: replacing a finished run of this stage (unless `resuming` it) or
    later stages' results is refused, or with `overwrite` they move aside (docs/robustness.md) into the folder
    returned (None: nothing moved here)."""
    later = [s for s in ORDER[ORDER.index(stage) + 1:] if os.path.isdir(os.path.join(result_dir, s))]
    own = not resuming and os.path.isfile(os.path.join(result_dir, stage, "metrics.json"))  # a finished run
    if not later and not own:
        return None
    if not overwrite:
        if later:
            raise UserError(f"{result_dir} holds results of later stages ({', '.join(s + '/' for s in later)}) "
                            f"made from the {stage}/ network this run replaces; give --overwrite to move them "
                            f"aside, or another --result_dir")
        raise UserError(f"{result_dir} holds a finished {STAGES[stage].label} run ({stage}/checkpoint.pt, "
                        f"{stage}/metrics.json) that this run would replace; give --overwrite to move it aside "
                        f"into {result_dir}/stale-<time>/, or another --result_dir")
    if not is_main:
        return None
    aside = stale_folder(result_dir)
    names = [name for name in [*([] if resuming else [stage]), *later, "table.md", "table.json"]
             if os.path.exists(os.path.join(result_dir, name))]
    moved = []
    try:
        # a folder is renamed into another only with write access to it (its ".." changes): checked first
        for name in names:
            path = os.path.join(result_dir, name)
            if os.path.isdir(path) and not os.access(path, os.W_OK):
                raise PermissionError(13, "Permission denied", path)
        os.makedirs(aside)
        for name in names:
            os.rename(os.path.join(result_dir, name), os.path.join(aside, name))
            moved.append(name)
    except OSError as e:
        for name in reversed(moved):  # put back what was moved: the folder as it was
            with contextlib.suppress(OSError):
                os.rename(os.path.join(aside, name), os.path.join(result_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(aside)
        where = f" ({e.filename})" if isinstance(e.filename, str) else ""
        raise UserError(f"cannot move stale results into {aside}: {e.strerror}{where}; nothing was moved") from None
    return aside
