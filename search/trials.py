"""One trial = one real run of stage 2 (a compression) or stage 3 (a GFLOPs target, or alpha) through the
stage's own main() (the entry points main_search.py hands over: Stages), in its own result folder under <search_dir>/trials/ (named by its study and trial
number: search/phase.py's trial_dir), ending on the validation split (--final_split val: no trial ever
reads the test split). Each folder records in trial.json what defines its result: the stage, its settings
(less where and how it runs: paths, device, workers) and the sha256 of the checkpoint it starts from. A
folder recording the same is read when its metrics.json exists, or resumed from its checkpoint; one made
under other settings (an earlier search with another config whose trial had the same number, in another
--storage) is moved into trials/stale-<time>/ and the trial runs: an old network is never reported as
the new settings' result.

    trials/<study>.static/<n>-compression<c>/        prune_config.json, prune/{checkpoint.pt, metrics.json, tb/}
    trials/<study>.dynamic.c<c>/<n>-<knob><x>/       rl/{checkpoint.pt, metrics.json, tb/}
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from utils.errors import UserError
from utils.files import read_json, write_json
from utils.lineage import file_sha256

# Settings of a trial that say where and how it runs, not what it computes: not part of its record
WHERE = ("result_dir", "checkpoint", "data_dir", "num_workers", "device", "resume")

# Stage 3's knob: the GFLOPs target where stage 3 has it, else alpha (larger alpha, fewer GFLOPs).
DYNAMIC_KNOBS = ("target_gflops", "alpha")


@dataclass(frozen=True)
class Stages:
    """The entry points of the stages a search runs (main_prune.py's and main_rl_prune.py's), handed over by
    main_search.py: the search imports no script."""
    prune: Callable        # stage 2's main(argv)
    rl: Callable           # stage 3's main(argv)
    rl_parse_args: Callable  # stage 3's parse_args(argv) -> its flags
    rl_check_args: Callable  # stage 3's check_args(flags): UserError for a refused flag


def stage3_knob(stages):
    """target_gflops when this stage 3 accepts --target_gflops, else alpha."""
    try:
        stages.rl_parse_args(["--target_gflops", "1"])
    except UserError:
        return "alpha"
    return "target_gflops"


STAGE3_FLAGS = {"--epochs": "--rl_epochs", "--lr": "--rl_lr", "--bs": "--rl_bs", "--alpha": "--rl_alpha",
                "--route_epochs": "--rl_route_epochs", "--route_lr": "--rl_route_lr"}  # stage 3's -> the search's


def stage3_argv(args, knob_name, stages):
    """main_rl_prune.py's flags of every dynamic trial from the search's (the knob's value is added per
    trial). Checked by stage 3's own parser and checks at once, so that the search never runs its static
    phase to find out that stage 3 refuses them: UserError naming the search's flag."""
    argv = ["--epochs", str(args.rl_epochs), "--lr", repr(args.rl_lr), "--bs", str(args.rl_bs),
            "--rl_weight", repr(args.rl_weight), "--gamma", repr(args.gamma), "--route_epochs",
            str(args.rl_route_epochs)]
    if args.rl_route_lr is not None and args.rl_route_epochs:
        argv += ["--route_lr", repr(args.rl_route_lr)]
    if knob_name == "target_gflops":  # alpha is where the dual ascent starts
        argv += ["--alpha", repr(args.rl_alpha)]
    probe = ["--target_gflops", "1"] if knob_name == "target_gflops" else ["--alpha", "1"]
    try:
        stages.rl_check_args(stages.rl_parse_args(argv + probe))
    except UserError as e:
        flag, _, rest = str(e).partition(" ")  # stage 3's errors start with the flag: name the search's
        flag = STAGE3_FLAGS.get(flag, flag)
        raise UserError(f"{flag} {rest} (stage 3's flag, as main_rl_prune.py would refuse it)") from None
    return argv


class Trials:
    """Runs the trials of one search under <search_dir>/trials through the stages' entry points `stages`.
    `data`: data_dir, img_type, resize, num_workers, val_split, seed (those of the stage-1 run);
    `prune_config`: the stage-2 config every static trial starts from; `rl_argv`: the stage-3 flags every
    dynamic trial shares."""

    def __init__(self, search_dir, stage1_path, data, prune_config, rl_argv, device, stages):
        self.root = os.path.join(search_dir, "trials")
        self.stages = stages
        self.stage1_path, self.data, self.device = stage1_path, data, device
        self.prune_config, self.rl_argv = prune_config, rl_argv

    def prune_settings(self, compression, folder):
        """The stage-2 config of a static trial: the given config, its target, this search's data and
        validation split, and an end on that split."""
        return {**self.prune_config, **self.data, "result_dir": folder, "checkpoint": self.stage1_path,
                "prune_mode": "one_pass", "compression": compression, "ratio": None, "rounds": None,
                "final_split": "val", "device": self.device,
                "resume": os.path.isfile(os.path.join(folder, "prune", "checkpoint.pt"))}

    def use_folder(self, folder, stage, settings, source):
        """Make `folder` the trial's: kept when its trial.json records this stage, `settings` (less WHERE) and
        starting checkpoint `source`; else what it holds is moved into <root>/stale-<time>/ (nothing
        deleted) and the record written, before the stage runs."""
        record = json.loads(json.dumps({"stage": stage, "source_sha256": file_sha256(source), "settings": {
            k: v for k, v in settings.items() if k not in WHERE}}))  # as read back from the file
        path = os.path.join(folder, "trial.json")
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if old == record:
            return
        if os.path.isdir(folder) and os.listdir(folder):
            stamp, within = time.strftime("stale-%Y%m%d-%H%M%S"), os.path.relpath(folder, self.root)
            aside, n = os.path.join(self.root, stamp, within), 1
            while os.path.exists(aside):
                aside, n = os.path.join(self.root, f"{stamp}-{n}", within), n + 1
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.rename(folder, aside)
            print(f"[search] {folder} holds a trial {self.difference(old, record)}: moved to {aside}; "
                  f"running it", flush=True)
        os.makedirs(folder, exist_ok=True)
        write_json(path, record)

    @staticmethod
    def difference(old, new):
        """What differs between two trial records, in words."""
        if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
            return "that records no settings (an earlier version's)"
        if old.get("source_sha256") != new["source_sha256"] or old.get("stage") != new["stage"]:
            return "started from another network"
        was, now = old["settings"], new["settings"]
        key = next(k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
        return f"made with other settings ({key} {was.get(key)!r}, now {now.get(key)!r})"

    def static(self, compression, folder):
        """Stage 2 at `compression` in `folder` -> its metrics (val_acc, val_gflops, params, compression, ...)."""
        metrics = os.path.join(folder, "prune", "metrics.json")
        self.use_folder(folder, "prune", self.prune_settings(compression, folder), self.stage1_path)
        if not os.path.isfile(metrics):
            config = os.path.join(folder, "prune_config.json")
            write_json(config, self.prune_settings(compression, folder))
            self.stages.prune(["--config_path", config])
        return {**read_json(metrics), "dir": folder, "checkpoint": os.path.join(folder, "prune", "checkpoint.pt")}

    def rl_command(self, source, folder, knob, x):
        d = self.data
        argv = ["--checkpoint", source, "--result_dir", folder, "--data_dir", d["data_dir"], "--img_type",
                d["img_type"], "--resize", str(d["resize"]), "--num_workers", str(d["num_workers"]),
                "--val_split", str(d["val_split"]), "--seed", str(d["seed"]), "--final_split", "val",
                f"--{knob}", repr(x), *self.rl_argv]
        if self.device:
            argv += ["--device", self.device]
        return argv  # flag, value pairs

    def dynamic(self, source, knob, x, folder):
        """Stage 3 from the static trial's checkpoint `source` at knob = x in `folder` -> its metrics."""
        metrics = os.path.join(folder, "rl", "metrics.json")
        argv = self.rl_command(source, folder, knob, x)
        self.use_folder(folder, "rl", {k[2:]: v for k, v in zip(argv[::2], argv[1::2])}, source)
        if not os.path.isfile(metrics):
            resume = os.path.isfile(os.path.join(folder, "rl", "checkpoint.pt"))
            self.stages.rl(argv + (["--resume"] if resume else []))
        return {**read_json(metrics), "dir": folder, "checkpoint": os.path.join(folder, "rl", "checkpoint.pt")}
