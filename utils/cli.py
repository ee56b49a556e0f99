"""Command-line flags shared by the stage scripts. A bad flag is one line and exit status 2."""
import argparse
import math

from utils.data import AUGMENTS
from utils.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line, no usage dump
        raise UserError(f"{message} (see --help)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags say in their help what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def base_parser(description):
    """Flags of the original stage-1 and stage-3 commands, plus ours."""
    p = Parser(description=description, formatter_class=Formatter)
    d = p.add_argument_group("data")
    d.add_argument("--data_dir", default="data", help="class folders train/<class>/*.<img_type> + test/..., "
                   "or cifar-100-python/ pickles; found automatically")
    d.add_argument("--img_type", default="png", help="image file extension in the class-folder layout")
    d.add_argument("--resize", type=int, default=None, help="side the images are brought to (default: 32 "
                   "for a new network, else the one the checkpoint was trained at; a different one is refused)")
    d.add_argument("--augment", default=None, choices=AUGMENTS,
                   help="training augmentation: cifar = random crop + horizontal flip, crop = random crop only "
                        "(digits, text: mirror images are other symbols), none (default: cifar for a new "
                        "network, else the checkpoint's)")
    d.add_argument("--download", action="store_true", help="fetch CIFAR-100 through torchvision if absent")
    d.add_argument("--val_split", type=float, default=0.0,
                   help="fraction of train held out for per-epoch validation (0: evaluate on test each epoch, "
                        "never selecting on it)")
    d.add_argument("--num_workers", type=int, default=4, help="processes decoding images once at start-up")
    d.add_argument("--final_split", default="test", choices=["test", "val"],
                   help="split of the final evaluation (metrics.json); val (needs --val_split > 0) never "
                        "touches the test split, as a search choosing settings must")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=200, help="epochs of this stage")
    t.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (peak of the schedule)")
    t.add_argument("--bs", type=int, default=128, help="batch size of a training step, over all processes: under "
                   "torchrun each of P processes takes bs / P images (bs must be divisible by P), so the flags mean "
                   "the same recipe on any number of GPUs")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (nesterov when > 0)")
    t.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    t.add_argument("--scheduler", default="cosine", choices=["cosine", "step", "constant"],
                   help="learning-rate schedule, per step (step: x0.1 at 50%% and 75%%)")
    t.add_argument("--seed", type=int, default=0, help="initialisation, data order, augmentation, sampling")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available). Under "
                   "torchrun each process takes cuda:LOCAL_RANK; cuda:N is refused when torchrun starts several "
                   "processes per machine (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    t.add_argument("--amp", default=None, choices=["bf16", "off"],
                   help="bf16: bfloat16 autocast (weights, optimizer state and checkpoints stay float32); off: "
                        "float32 throughout (default: bf16 on CUDA, off on CPU)")
    t.add_argument("--tf32", action="store_true",
                   help="allow TF32 (a 10-bit mantissa) for the training step's float32 convolutions and matmuls on "
                        "CUDA (with --amp off: faster on Ampere and later GPUs); off by default, and always off for "
                        "the final evaluation, the counterfactual losses and anything that says float32")
    t.add_argument("--channels_last", default=None, action=argparse.BooleanOptionalAction,
                   help="weights and batches in the NHWC memory format; --no-channels_last: NCHW (default: on "
                        "with CUDA, off on CPU)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model in the training step (forward and backward): on CUDA inductor "
                        "with CUDA graphs (reduce-overhead), so the step is not bound by the host launching "
                        "its many small ops; minutes of compiling first. Elsewhere aot_eager (no speed-up). "
                        "Evaluation runs uncompiled")
    t.add_argument("--result_dir", default="results", help="each stage writes <result_dir>/<stage>/")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from this stage's last checkpoint (default: the one in --result_dir)")
    t.add_argument("--overwrite", action="store_true",
                   help="when --result_dir holds a finished run of this stage (which this run replaces) or later "
                        "stages' results (made from the network this run replaces), move them into "
                        "<result_dir>/stale-<time>/ instead of refusing")
    return p


def check_finite(args):
    """Every float flag finite: argparse's float() takes "inf" and "nan", which no range check below refuses
    reliably (nan fails every comparison) and no training survives."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} {value} must be a finite number")


def check_ranges(args):
    """Values argparse cannot check by type alone (every float finite, then the ranges)."""
    check_finite(args)
    checks = [("epochs", args.epochs >= 0, "must be >= 0"), ("lr", args.lr > 0, "must be > 0"),
              ("bs", args.bs >= 1, "must be >= 1"), ("momentum", 0 <= args.momentum < 1, "must be in [0, 1)"),
              ("weight_decay", args.weight_decay >= 0, "must be >= 0"),
              ("resize", args.resize is None or args.resize >= 8, "must be >= 8"), ("num_workers", args.num_workers >= 0, "must be >= 0"),
              ("val_split", 0 <= args.val_split < 1, "must be in [0, 1)")]
    for name, ok, why in checks:
        if not ok:
            raise UserError(f"--{name} {getattr(args, name)} {why}")
