"""Stage 2's config file (config.json): every key with its type, default, check and meaning (PruneSettings).
docs/config.md's key table is generated from KEYS (markdown_table), so documentation and validation cannot
drift apart; the pruning targets and rounds are described there."""
import dataclasses
import json
import re

from utils.cli import NULL, CommonSettings, Setting, in_range, like, settings_of
from utils.errors import UserError

REQUIRED = object()  # the default of a key that must be given
NUMBER, INT, BOOL, STR = (int, float), (int,), (bool,), (str,)


@dataclasses.dataclass
class PruneSettings(CommonSettings):
    """Stage 2's settings: the config keys (each a Setting), then what the command line adds (overwrite) and the
    rounds actually run (schedule: [{"target": "compression" | "ratio" | "gflops", "value", "epochs", "lr"}])."""
    data_dir: str = like(CommonSettings, "data_dir", REQUIRED)
    epochs: int = Setting(INT, "fine-tuning epochs (per round in iterative mode, unless the round says)",
                          in_range(0))(100)
    lr: float = Setting(NUMBER, "fine-tuning learning rate (SGD, nesterov when momentum > 0; per round unless the "
                        "round says)", in_range(0, lo_open=True))(0.01)
    result_dir: str = like(CommonSettings, "result_dir", REQUIRED)
    checkpoint: str = Setting(STR + (NULL,), "stage-1 checkpoint to prune; null: "
                              "<result_dir>/sp/checkpoint.pt")(None)
    resume: str = Setting(BOOL + STR + (NULL,), "continue an interrupted run: true for "
                          "<result_dir>/prune/checkpoint.pt, or a path; false/null starts afresh")(False)
    prune_mode: str = Setting(STR, "one_pass: prune once to `compression`, `ratio` or `gflops`, then fine-tune; "
                              "iterative: the prune/fine-tune rounds listed in `rounds`",
                              choices=("one_pass", "iterative"))("one_pass")
    compression: float = Setting(NUMBER + (NULL,), "one_pass target: fraction of the stage-1 model's parameters "
                                 "(all of them) removed, met within 1 point", in_range(0, 1, lo_open=True))(None)
    ratio: float = Setting(NUMBER + (NULL,), "one_pass target instead of compression: fraction of all "
                           "eigendirections (inputs and outputs of every layer, pooled) cut by the global "
                           "threshold", in_range(0, 1))(None)
    gflops: float = Setting(NUMBER + (NULL,), "one_pass target instead of compression: GFLOPs per image of the "
                            "pruned network at `resize`, every block run (metrics.json dense_gflops), met within 1%",
                            in_range(0, lo_open=True))(None)
    rounds: list = Setting((list, NULL), "iterative only: [{\"compression\" | \"ratio\" | \"gflops\": x, "
                           "\"epochs\": n?, \"lr\": x?}, ...], one prune + fine-tune per entry")(None)
    fisher_type: str = Setting(STR, "labels of the factor pass: true = sampled from the model's softmax, "
                               "empirical = the real labels", choices=("true", "empirical"))("true")
    fisher_batches: int = Setting(INT, "batches of bs unaugmented training images in each factor pass (bs over all "
                                  "processes; at most all; spread evenly over the training set)", in_range(1))(200)
    damping: float = Setting(NUMBER, "added to each Kronecker factor before eigh, relative to its mean eigenvalue "
                             "(damping * trace/n * I); raised tenfold if eigh fails", in_range(0))(1e-3)
    prune_ratio_limit: float = Setting(NUMBER, "largest fraction of one side (inputs or outputs) of one layer that "
                                       "may be cut", in_range(0, 1, lo_open=True, hi_open=False))(0.95)
    criterion: str = Setting(STR, "what the global threshold ranks directions by: score = EigenDamage's estimate "
                             "of the loss increase; score_per_param / score_per_flop = that score divided by the "
                             "parameters / FLOPs per image the direction costs (the default: the saved network runs "
                             "fastest, with as much accuracy as the others within the seeds' spread; "
                             "bench/bench_prune.py, bench/bench_criteria.py); score_per_cost = per FLOP for a gflops "
                             "target, else per parameter; score = EigenDamage's own ranking",
                             choices=("score", "score_per_param", "score_per_flop", "score_per_cost"))("score_per_flop")
    round_to: int = Setting(INT, "every side keeps a multiple of this many directions (or all of them): 8 matches "
                            "the 8-float channel blocks of onnxruntime's CPU kernels on AVX2 and the channel "
                            "multiples of 8 that GPU tensor cores take in bf16; 1 = EigenDamage's free ranks; the "
                            "speed-up is measured by bench/bench_prune.py", in_range(1))(8)
    mode: str = Setting(STR, "the network the factor pass and the fine-tuning run: open = every block, no switch "
                        "(the static network of the row \"static pruning only\"); hard = stage 1's routes "
                        "(switches in hard mode, straight-through). The row is the pruned network with every block "
                        "either way", choices=("open", "hard"))("open")
    fix_rotation: bool = Setting(BOOL, "freeze the 1x1 rotation convs while fine-tuning")(False)
    overwrite: bool = False
    schedule: list = None


# key: (accepted types, default, (check, what the check demands), description): the config keys of PruneSettings
KEYS = {name: (s.types, default, (s.accepts, s.demand()), s.help) for name, default, s in settings_of(PruneSettings)}
ROUND_KEYS = ("compression", "ratio", "gflops", "epochs", "lr")
TARGET_KEYS = ("compression", "ratio", "gflops")
TYPE_NAMES = {int: "integer", float: "number", bool: "true/false", str: "string", list: "list", NULL: "null"}


def _type_name(types):
    return " or ".join(TYPE_NAMES[t] for t in types if not (t is int and float in types))  # 3 is a number too


def _check(where, key, value):
    types, _, (ok, demand), _ = KEYS[key]
    # bool is an int in Python; a JSON true is never accepted as a number (nor 1 as a boolean)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise UserError(f"{where}: key '{key}' must be {_type_name(types)}, got {json.dumps(value)}")
    if value is not None and not ok(value):
        raise UserError(f"{where}: key '{key}' {demand}, got {json.dumps(value)}")


def _check_object(where, obj, known, expected):
    """A JSON object holding only `known` keys, each of the right type and range."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected {expected}, got {json.dumps(obj)[:60]}")
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(known)})")
    for key, value in obj.items():
        _check(where, key, value)


def validate(cfg, where="config"):
    """Check a config dict -> its PruneSettings (defaults filled in), `rounds` resolved to the schedule run."""
    _check_object(where, cfg, KEYS, "a JSON object of keys")
    missing = [k for k, spec in KEYS.items() if spec[1] is REQUIRED and k not in cfg]
    if missing:
        raise UserError(f"{where}: missing required key '{missing[0]}'")
    out = {k: cfg.get(k, spec[1]) for k, spec in KEYS.items()}
    return PruneSettings(**out, schedule=_schedule(out, where))


def _target(entry, where):
    given = [k for k in TARGET_KEYS if entry.get(k) is not None]
    if len(given) != 1:
        raise UserError(f"{where}: give exactly one of 'compression', 'ratio' and 'gflops'"
                        + ({2: " (both given)", 3: " (all three given)"}.get(len(given), "")))
    return given[0], entry[given[0]]


def _schedule(cfg, where):
    if cfg["prune_mode"] == "one_pass":
        if cfg["rounds"] is not None:
            raise UserError(f"{where}: key 'rounds' is for prune_mode iterative (one_pass prunes to the "
                            f"top-level compression or ratio)")
        target, value = _target(cfg, where)
        return [{"target": target, "value": value, "epochs": cfg["epochs"], "lr": cfg["lr"]}]
    for key in TARGET_KEYS:
        if cfg[key] is not None:
            raise UserError(f"{where}: key '{key}' is for prune_mode one_pass; in iterative mode every "
                            f"entry of 'rounds' gives its own target")
    if not cfg["rounds"]:
        raise UserError(f"{where}: prune_mode iterative needs key 'rounds', a non-empty list of "
                        f"{{\"compression\" | \"ratio\": x, \"epochs\": n, \"lr\": x}}")
    schedule, last_compression, last_gflops = [], 0.0, float("inf")
    for i, entry in enumerate(cfg["rounds"]):
        at = f"{where}: rounds[{i}]"
        _check_object(at, entry, ROUND_KEYS, 'an object like {"compression": 0.4, "epochs": 5}')
        target, value = _target(entry, at)
        if target == "compression":
            if value <= last_compression:
                raise UserError(f"{at}: key 'compression' {value} must exceed the previous round's "
                                f"{last_compression} (both are measured against the stage-1 model)")
            last_compression = value
        if target == "gflops":
            if value >= last_gflops:
                raise UserError(f"{at}: key 'gflops' {value} must be below the previous round's {last_gflops}")
            last_gflops = value
        schedule.append({"target": target, "value": value, "epochs": entry.get("epochs", cfg["epochs"]),
                         "lr": entry.get("lr", cfg["lr"])})
    return schedule


def load_config(path, overrides=None, sets=None):
    """Read, apply `sets` (--set: null too, to clear a key), then command-line overrides (None: not given), validate."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--config_path {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config_path {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config_path {path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    where = str(path)
    if isinstance(cfg, dict):
        cfg.update(sets or {})
        cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if sets:  # an error may be in a value given on the command line, not in the file
            where += f" with --set {', '.join(sets)}"
    return validate(cfg, where=where)


def markdown_table():
    """docs/config.md's table of config keys, generated from KEYS."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (types, default, (_, demand), text) in KEYS.items():
        kind = _type_name(types)
        shown = "required" if default is REQUIRED else f"`{json.dumps(default)}`"
        text = re.sub(r"(\S*<\S*>\S*?)(?=[,;:)]?(\s|$))", r"`\1`", text)  # paths like <result_dir>/sp as code
        rows.append(f"| `{key}` | {kind} | {shown} | {text}{f' ({demand})' if demand else ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m pruners.config > table.md: docs/config.md's table
    print(markdown_table())
