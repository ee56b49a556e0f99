"""One definition per setting: its accepted types, its check and its help (Setting), serving the stages'
command-line flags (parse, check) and stage 2's config keys (pruners/config.py) alike. A stage's settings
are a dataclass whose fields are Settings with the stage's default; the shared ones (data, training) are
StageSettings'. A bad flag or value is one line and exit status 2."""
import argparse
import dataclasses
import math

from utils.data import AUGMENTS
from utils.dist import PRECISIONS
from utils.errors import UserError

NULL = type(None)
ANY = (lambda v: True, "")


def one_of(*choices):
    return lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}"


def in_range(lo, hi=None, lo_open=False, hi_open=True):
    """(check, what it demands) of a number in [lo, hi) (or as opened), hi None: no upper end."""
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if hi is None:
        return ok, f"must be {'>' if lo_open else '>='} {lo}"
    return ok, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


@dataclasses.dataclass(frozen=True, eq=False)
class Setting:
    """What a setting accepts (types: a flag's type is the first; a config key takes any of them), the check
    of a given value, its help, the choices a flag offers, the flag's group (None: not a flag) and
    argparse's own keywords where a flag is more than a typed value (--resume's optional path, say)."""
    types: tuple
    help: str
    check: tuple = ANY
    choices: tuple = None
    group: str = None
    flag: dict = None

    def __call__(self, default):
        """A dataclass field holding this setting with the stage's `default`."""
        return dataclasses.field(default=default, metadata={"setting": self})

    def demand(self):
        return self.check[1] or (one_of(*self.choices)[1] if self.choices else "")

    def accepts(self, value):
        return value is None or (self.check[0](value) and (self.choices is None or value in self.choices))


def settings_of(cls):
    """(name, default, Setting) of every setting of a settings dataclass (or instance), in order."""
    return [(f.name, f.default, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line, no usage dump
        raise UserError(f"{message} (see --help)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags say in their help what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse(cls, description, titles, argv=None):
    """Settings `cls` from the command line `argv` (not yet checked: check()): a flag per setting whose Setting
    names a group, in the groups' `titles`."""
    parser = Parser(description=description, formatter_class=Formatter)
    groups = {key: parser.add_argument_group(title) if title else parser for key, title in titles.items()}
    for name, default, s in settings_of(cls):
        if s.group is None:
            continue
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        kwargs = {"default": default, "help": s.help, "choices": s.choices, **(s.flag or {})}
        if "action" not in kwargs:
            kwargs.update({"action": "store_true"} if s.types[0] is bool else {"type": s.types[0]})
        groups[s.group].add_argument(f"--{name}", **{k: v for k, v in kwargs.items() if v is not None})
    return cls(**vars(parser.parse_args(argv)))


def check(settings, flag=lambda name: f"--{name}", suffix=""):
    """UserError naming the flag (`flag(name)`) of the first setting not finite, then of the first refused."""
    values = [(name, getattr(settings, name), s) for name, _, s in settings_of(settings)]
    for name, value, _ in values:  # float("inf") and "nan" parse, and nan fails every comparison
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(name)} {value} must be a finite number{suffix}")
    for name, value, s in values:
        if not s.accepts(value):
            raise UserError(f"{flag(name)} {value} {s.demand()}{suffix}")


def like(cls, name, default):
    """The setting `name` of settings dataclass `cls`, with another `default` (a field of another class)."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["setting"](default)


NOT_EMPTY = (lambda v: bool(v), "must not be empty")


@dataclasses.dataclass
class CommonSettings:
    """The data and training settings of the three stages (flags of stages 1 and 3, config keys of stage 2)."""
    data_dir: str = Setting((str,), "class folders train/<class>/*.<img_type> + test/..., or cifar-100-python/ "
                            "pickles; found automatically", NOT_EMPTY, group="data")("data")
    img_type: str = Setting((str,), "image file extension in the class-folder layout", NOT_EMPTY,
                            group="data")("png")
    resize: int = Setting((int, NULL), "side, in pixels, the images are brought to (default: 32 for a new network, "
                          "else the one the checkpoint was trained at; a different one is refused)", in_range(8),
                          group="data")(None)
    augment: str = Setting((str, NULL), "training augmentation: cifar = random crop + horizontal flip, crop = "
                           "random crop only (digits, text: mirror images are other symbols), none (default: cifar "
                           "for a new network, else the checkpoint's)", choices=AUGMENTS, group="data")(None)
    download: bool = Setting((bool,), "fetch CIFAR-100 through torchvision if absent", group="data")(False)
    val_split: float = Setting((float, int), "fraction of train held out for per-epoch validation (0: evaluate on "
                               "test each epoch, never selecting on it)", in_range(0, 1), group="data")(0.0)
    num_workers: int = Setting((int,), "processes decoding images once at start-up", in_range(0), group="data")(4)
    final_split: str = Setting((str,), "split of the final evaluation (metrics.json); val (needs val_split > 0) "
                               "never touches the test split, as a search choosing settings must",
                               choices=("test", "val"), group="data")("test")
    epochs: int = Setting((int,), "epochs of this stage", in_range(0), group="training")(200)
    lr: float = Setting((float,), "SGD learning rate (peak of the schedule)", in_range(0, lo_open=True),
                        group="training")(0.1)
    bs: int = Setting((int,), "batch size of a training step, over all processes: under torchrun each of P "
                      "processes takes bs / P images (bs must be divisible by P), so the settings mean the same "
                      "recipe on any number of GPUs", in_range(1), group="training")(128)
    momentum: float = Setting((float, int), "SGD momentum (nesterov when > 0)", in_range(0, 1), group="training")(0.9)
    weight_decay: float = Setting((float, int), "SGD weight decay", in_range(0), group="training")(5e-4)
    scheduler: str = Setting((str,), "learning-rate schedule, per step (step: x0.1 at half and at three quarters of "
                             "the steps)", choices=("cosine", "step", "constant"), group="training")("cosine")
    seed: int = Setting((int,), "initialisation, data order, augmentation, sampling", group="training")(0)
    device: str = Setting((str, NULL), "cpu, cuda or cuda:N (default: cuda when available). Under torchrun each "
                          "process takes cuda:LOCAL_RANK; cuda:N is refused when torchrun starts several processes "
                          "per machine (choose the GPUs with CUDA_VISIBLE_DEVICES)", group="training")(None)
    amp: str = Setting((str, NULL), "bf16: bfloat16 autocast (weights, optimizer state and checkpoints stay "
                       "float32); off: float32 throughout (default: bf16 on CUDA, off on CPU)",
                       choices=PRECISIONS, group="training")(None)
    tf32: bool = Setting((bool,), "allow TF32 (a 10-bit mantissa) for the training step's float32 convolutions and "
                         "matmuls on CUDA (with amp off: faster on Ampere and later GPUs); off by default, and always "
                         "off for the final evaluation, the factor pass, the counterfactual losses and anything that "
                         "says float32", group="training")(False)
    channels_last: bool = Setting((bool, NULL), "weights and batches in the NHWC memory format; --no-channels_last: "
                                  "NCHW (default: on with CUDA, off on CPU)", group="training",
                                  flag={"action": argparse.BooleanOptionalAction})(None)
    result_dir: str = Setting((str,), "each stage writes <result_dir>/<stage>/", NOT_EMPTY,
                              group="training")("results")


@dataclasses.dataclass
class StageSettings(CommonSettings):
    """The settings of stages 1 and 3 (and their flags): the common ones and how they run."""
    compile: bool = Setting((bool,), "torch.compile the model in the training step (forward and backward): on CUDA "
                            "inductor with CUDA graphs (reduce-overhead), so the step is not bound by the host "
                            "launching its many small ops; minutes of compiling first. Elsewhere aot_eager (no "
                            "speed-up). Evaluation runs uncompiled", group="training")(False)
    resume: str = Setting((str, NULL), "continue from this stage's last checkpoint (default: the one in "
                          "--result_dir)", group="training",
                          flag={"nargs": "?", "const": "auto", "metavar": "PATH"})(None)
    overwrite: bool = Setting((bool,), "when result_dir holds a finished run of this stage (which this run replaces) "
                              "or later stages' results (made from the network this run replaces), move them into "
                              "<result_dir>/stale-<time>/ instead of refusing", group="training")(False)
    switch_lr: float = Setting((float, NULL), "learning rate of the switches (default: --lr); follows the same "
                               "schedule", in_range(0, lo_open=True), group="switch optimisation")(None)
    switch_weight_decay: float = Setting((float, NULL), "weight decay of the switches (default: --weight_decay)",
                                         in_range(0), group="switch optimisation")(None)
