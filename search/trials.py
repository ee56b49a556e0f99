"""One trial = one real run of stage 2 (a compression) or stage 3 (a GFLOPs target, or alpha) through the
stage's own main() (the entry points main_search.py hands over: Stages), in its own result folder under <search_dir>/trials/ (named by its study and trial
number: search/phase.py's trial_dir), ending on the validation split (--final_split val: no trial ever
reads the test split). A folder whose metrics.json exists is read, not run again; one with a checkpoint but
no metrics.json (an interrupted trial) is resumed from it.

    trials/<study>.static/<n>-compression<c>/        prune_config.json, prune/{checkpoint.pt, metrics.json, tb/}
    trials/<study>.dynamic.c<c>/<n>-<knob><x>/       rl/{checkpoint.pt, metrics.json, tb/}
"""
import json
import os
from dataclasses import dataclass
from typing import Callable

from utils.errors import UserError
from utils.files import read_json

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

    def static(self, compression, folder):
        """Stage 2 at `compression` in `folder` -> its metrics (val_acc, val_gflops, params, compression, ...)."""
        metrics = os.path.join(folder, "prune", "metrics.json")
        if not os.path.isfile(metrics):
            os.makedirs(folder, exist_ok=True)
            config = os.path.join(folder, "prune_config.json")
            with open(config, "w") as f:
                json.dump(self.prune_settings(compression, folder), f, indent=2)
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
        if os.path.isfile(os.path.join(folder, "rl", "checkpoint.pt")):
            argv.append("--resume")
        return argv

    def dynamic(self, source, knob, x, folder):
        """Stage 3 from the static trial's checkpoint `source` at knob = x in `folder` -> its metrics."""
        metrics = os.path.join(folder, "rl", "metrics.json")
        if not os.path.isfile(metrics):
            self.stages.rl(self.rl_command(source, folder, knob, x))
        return {**read_json(metrics), "dir": folder, "checkpoint": os.path.join(folder, "rl", "checkpoint.pt")}
