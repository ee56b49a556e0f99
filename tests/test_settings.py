"""One definition per setting: a setting shared by the stages' flags and stage 2's config keys has one help and
one check, and the search passes the stages their settings, not command lines or files."""
import contextlib
import io
import re

import pytest

import main_rl_prune
import main_sp
from pruners.config import KEYS, load_config
from utils.errors import UserError

SHARED = ("img_type", "resize", "augment", "download", "val_split", "final_split", "num_workers", "bs", "momentum",
          "weight_decay", "scheduler", "seed", "device", "amp", "channels_last", "tf32")


def help_text(module):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return re.sub(r"\s", "", out.getvalue())  # argparse wraps lines, at hyphens too


@pytest.mark.parametrize("module", [main_sp, main_rl_prune])
def test_a_setting_of_flags_and_config_keys_has_one_help(module):
    shown = help_text(module)
    for key in SHARED:
        assert re.sub(r"\s", "", KEYS[key][3]) in shown, key  # stage 2's key says what the flag says


@pytest.mark.parametrize("key,value,demand", [("momentum", "1", "must be in [0, 1)"), ("bs", "0", "must be >= 1"),
                                              ("resize", "4", "must be >= 8")])
def test_a_setting_of_flags_and_config_keys_has_one_check(tmp_path, key, value, demand):
    with pytest.raises(UserError, match=re.escape(f"--{key} {value}")) as flag:
        from stages.sp import check_settings
        check_settings(main_sp.parse_args([f"--{key}", value]))
    config = tmp_path / "c.json"
    config.write_text('{"result_dir": "r", "data_dir": "d", "compression": 0.5}')
    with pytest.raises(UserError, match=re.escape(f"key '{key}' {demand}, got {value}")):
        load_config(str(config), sets={key: int(value)})
    assert str(flag.value).endswith(demand)


def test_every_flag_parses_to_its_settings_type():
    """A flag with a metavar or other argparse keywords still parses to the setting's type (a number flag
    read as a string would fail its check or, worse, be compared as text)."""
    from stages.rl import RLSettings
    from utils.cli import settings_of
    numbers = [(name, s.types[0]) for name, _, s in settings_of(RLSettings) if s.group and s.types[0] in (int, float)]
    assert ("target_gflops", float) in numbers and ("flip_blocks", int) in numbers
    for name, kind in numbers:
        assert type(getattr(main_rl_prune.parse_args([f"--{name}", "1"]), name)) is kind, name
