"""One trial = one real run of stage 2 (a compression) or stage 3 (a GFLOPs target, or alpha): the stage's own
function in this process, in its own folder under <search_dir>/trials/, ending on the validation split. Its
trial.json records what defines its result, so that an old network is never reported as new settings'
result (the folders and their records: docs/search.md).
"""
import dataclasses
import json
import os

from pruners.config import validate
from runtime.stage import WHERE
from stages import prune as stage2, rl as stage3
from utils.files import read_json, write_json
from utils.lineage import file_sha256, stale_folder

# Stage 3's knob: the GFLOPs target (the default), or alpha (larger alpha, fewer GFLOPs).
DYNAMIC_KNOBS = ("target_gflops", "alpha")

# stage 3's settings that the search sets, by its own flags
STAGE3_FLAGS = {"epochs": "rl_epochs", "lr": "rl_lr", "bs": "rl_bs", "rl_weight": "rl_weight", "gamma": "gamma",
                "alpha": "rl_alpha", "route_epochs": "rl_route_epochs", "route_lr": "rl_route_lr"}


def stage3_settings(args, knob_name):
    """Stage 3's settings of every dynamic trial from the search's flags (the data, the knob's value and the
    paths are set later), checked by stage 3's own checks at once, so that the search never runs its static phase
    to find out that stage 3 refuses them: UserError naming the search's flag."""
    # alpha: where the dual ascent starts, unless it is the knob
    settings = stage3.RLSettings(**{k: getattr(args, a) for k, a in STAGE3_FLAGS.items()}, final_split="val")
    settings.route_lr = settings.route_lr if settings.route_epochs else None
    probe = dataclasses.replace(settings, **{knob_name: 1.0})  # a value of the knob, for the checks
    stage3.check_settings(probe, flag=lambda name: f"--{STAGE3_FLAGS.get(name, name)}",
                          suffix=" (stage 3's setting, as main_rl_prune.py would refuse it)")
    return settings


def record_of(settings):
    """What defines a stage's result among its settings (a dict or a settings dataclass), as trial.json holds it."""
    values = settings if isinstance(settings, dict) else dataclasses.asdict(settings)
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in WHERE}))


class Trials:
    """Runs the trials of one search under <search_dir>/trials. `data`: the stage-1 run's data settings and
    split; `prune_config`, `rl_settings`: what every static / dynamic trial starts from."""

    def __init__(self, search_dir, stage1_path, data, prune_config, rl_settings, device, run_prune=None,
                 run_rl=None):
        self.root = os.path.join(search_dir, "trials")
        self.run_prune = run_prune or (lambda settings: stage2.run(settings))
        self.run_rl = run_rl or (lambda settings: stage3.run(settings))
        self.stage1_path, self.data, self.device = stage1_path, data, device
        self.prune_config, self.rl_settings = prune_config, rl_settings

    def use_folder(self, folder, stage, settings, source):
        """Make `folder` the trial's: kept when its trial.json records this stage, `settings` and `source`; else
        what it holds is moved into <root>/stale-<time>/ and the record written, before the stage runs."""
        record = {"stage": stage, "source_sha256": file_sha256(source), "settings": record_of(settings)}
        path = os.path.join(folder, "trial.json")
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if old == record:
            return
        if os.path.isdir(folder) and os.listdir(folder):
            within = os.path.relpath(folder, self.root)
            aside = os.path.join(stale_folder(self.root, within), within)
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
        """Stage 2 at `compression` in `folder`, from the search's config, data and validation split -> its metrics."""
        config = {**self.prune_config, **self.data, "result_dir": folder, "checkpoint": self.stage1_path,
                  "prune_mode": "one_pass", "compression": compression, "ratio": None, "rounds": None,
                  "final_split": "val", "device": self.device,
                  "resume": os.path.isfile(os.path.join(folder, "prune", "checkpoint.pt"))}
        self.use_folder(folder, "prune", config, self.stage1_path)
        return self.finished(folder, "prune", lambda: self.run_prune(validate(config, where="the search's config")))

    def dynamic(self, source, knob, x, folder):
        """Stage 3 from the static trial's checkpoint `source` at knob = x in `folder` -> its metrics."""
        resume = os.path.isfile(os.path.join(folder, "rl", "checkpoint.pt"))
        settings = dataclasses.replace(self.rl_settings, checkpoint=source, result_dir=folder, device=self.device,
                                       resume="auto" if resume else None, **{knob: x})
        self.use_folder(folder, "rl", settings, source)
        return self.finished(folder, "rl", lambda: self.run_rl(settings))

    @staticmethod
    def finished(folder, stage, run):
        """The metrics of the trial in `folder`: those its stage wrote when it ran to the end before, else
        run()'s; with where its network is."""
        path = os.path.join(folder, stage, "metrics.json")
        metrics = read_json(path) if os.path.isfile(path) else run()
        return {**metrics, "dir": folder, "checkpoint": os.path.join(folder, stage, "checkpoint.pt")}
