"""Stage 2: prune the stage-1 network in the Kronecker-factored eigenbasis (EigenDamage), then fine-tune.

    python main_prune.py --config_path config.json [--resume [PATH]] [--result_dir DIR] [--data_dir DIR]
                         [--device DEV] [--checkpoint PATH] [--set KEY=VALUE ...] [--overwrite]

The config keys are pruners/config.py's PruneSettings, the flags override the keys of the same name; what the
stage does is stages.prune.run.
"""
import dataclasses
import json

from pruners.config import load_config
from stages import prune
from utils.cli import Parser
from utils.errors import UserError, run_main


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config_path", required=True, help="the JSON config (keys: pruners/config.py)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from this stage's last checkpoint (default: the one in result_dir)")
    for key in ("result_dir", "data_dir", "device", "checkpoint"):
        p.add_argument(f"--{key}", default=None, help=f"overrides the config's '{key}'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key for this run (VALUE as JSON: --set epochs=5 --set "
                        "criterion=score; a bare word is a string); repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="when result_dir holds a finished stage-2 run (which this run replaces) or stage 3's results "
                        "(made from the network this run replaces), move them into <result_dir>/stale-<time>/ "
                        "instead of refusing")
    return p.parse_args(argv)


def parse_overrides(items):
    """{key: value} of --set KEY=VALUE items (VALUE read as JSON, else taken as a string)."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item}: expected KEY=VALUE (e.g. --set epochs=5)")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_path, {k: getattr(args, k) for k in ("result_dir", "data_dir", "device",
                                                                        "checkpoint", "resume")},
                      sets=parse_overrides(args.overrides))
    prune.run(dataclasses.replace(cfg, overwrite=args.overwrite))


if __name__ == "__main__":
    run_main(main)
