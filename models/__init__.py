"""Models are built from a plain architecture description (a JSON-serialisable dict), so that every
checkpoint can be rebuilt without pickled modules:

    {"network": "resnet", "depth": 32, "width": 4, "num_classes": 100, "gate": "rnn",
     "in_channels": 3, "ranks": {"blocks.3.conv1": [r_in, r_out], ...}}

`ranks` is empty for an unpruned network; static pruning fills it with the kept eigendirections of every
factored conv (a rank equal to the conv's width on that side: no rotation there).
"""
from models.switches import SWITCH_KINDS, Switches, switch_kind  # noqa: F401 (a new kind: see Switches)
from models.resnet import FactoredConv, ResNet
from utils.errors import UserError

NETWORKS = ("resnet",)


def make_arch(network="resnet", depth=32, width=4, num_classes=100, gate="rnn", in_channels=3, ranks=None):
    arch = {"network": network, "depth": depth, "width": width, "num_classes": num_classes, "gate": gate,
            "in_channels": in_channels, "ranks": dict(ranks or {})}
    check_arch(arch)
    return arch


def check_arch(arch):
    """Raise UserError naming the first thing wrong with an architecture description."""
    if not isinstance(arch, dict):
        raise UserError("architecture description is not a dict")
    if arch.get("network") not in NETWORKS:
        raise UserError(f"unknown --network {arch.get('network')!r} (expected one of: {', '.join(NETWORKS)})")
    depth = arch.get("depth")
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise UserError(f"--depth {depth} is not 6n+2 with n >= 1 (e.g. 20, 32, 56, 110)")
    for key in ("width", "num_classes", "in_channels"):
        if not isinstance(arch.get(key), int) or arch[key] < 1:
            raise UserError(f"{key} must be a positive integer, got {arch.get(key)!r}")
    if arch.get("gate") not in SWITCH_KINDS:
        raise UserError(f"unknown --gate {arch.get('gate')!r} (expected one of: {', '.join(SWITCH_KINDS)})")
    ranks = arch.get("ranks", {})
    if not isinstance(ranks, dict) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) and v >= 1 for v in r)
            for r in ranks.values()):
        raise UserError("ranks must map conv names to [rank_in, rank_out] positive integers")


def build_model(arch):
    check_arch(arch)
    model = ResNet(arch)
    unknown = set(arch.get("ranks", {})) - {n for n, m in model.named_modules() if isinstance(m, FactoredConv)}
    if unknown:
        raise UserError(f"ranks name convs this network does not have: {sorted(unknown)[:3]}")
    for name, m in model.named_modules():
        if isinstance(m, FactoredConv) and (m.core.in_channels > m.channels[0] or m.core.out_channels > m.channels[1]):
            raise UserError(f"ranks of {name}: {arch['ranks'][name]} exceed its widths {list(m.channels)}")
    return model
