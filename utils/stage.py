"""What every stage does around its own algorithm: load the data once, guard --result_dir, run the shared
epoch loop with a checkpoint per epoch, and write metrics.json. The three main_*.py scripts only add
their flags, their model and their step function."""
import os
import sys
import time
from dataclasses import dataclass

import torch

from utils.checkpoint import save_checkpoint
from utils.data import MIN_STD, BatchLoader, channel_stats, load_dataset, make_pipeline, split_val
from utils.dist import barrier
from utils.engine import evaluate, rng_state, seed_epoch, summary_line, train_epoch, write_json
from utils.errors import UserError
from utils.faults import kill_point
from utils.flops import count_params
from utils.log import Logger

DEFAULT_RESIZE = 32


@dataclass
class Data:
    train: BatchLoader        # augmented, shuffled, sharded over ranks
    plain_train: BatchLoader  # train images shuffled, not augmented (stage 2's factor pass, BN statistics)
    eval: BatchLoader         # validation split if --val_split > 0, else test (reported, never selected on)
    test: BatchLoader
    num_classes: int
    image_size: int
    eval_name: str
    pipeline: dict            # what checkpoints record (utils.data.make_pipeline)


def load_data(args, ctx, bs=None, recorded=None, source=None, resuming=False):
    """Decode the dataset once into memory (on the device), split off validation, build the loaders.
    `recorded`: the input pipeline of the checkpoint this stage starts from (`source` names it): its
    resize, normalisation and class names are used, and a conflicting resize or class list is refused in
    one line. Its augmentation is the default; `resuming` (the stage's own checkpoint) makes a different
    one a conflict too. Without a record: args.resize (default 32), statistics of the training split."""
    resize, augment = args.resize, getattr(args, "augment", None)
    if recorded is not None:
        if resize is not None and resize != recorded["resize"]:
            raise UserError(f"resize {resize} conflicts with {source}, trained on images resized to "
                            f"{recorded['resize']} (leave resize out to use it)")
        if resuming and augment is not None and augment != recorded["augment"]:
            raise UserError(f"augment {augment} conflicts with {source}, trained with augment "
                            f"{recorded['augment']}")
        resize, augment = recorded["resize"], augment or recorded["augment"]
    elif source is not None and ctx.is_main:
        print(f"warning: {source} records no input pipeline (written by an older version): using resize "
              f"{resize or DEFAULT_RESIZE} and the statistics of this training set", file=sys.stderr, flush=True)
    resize, augment = resize or DEFAULT_RESIZE, augment or "cifar"
    ds = load_dataset(args.data_dir, args.img_type, resize, args.download, args.num_workers)
    if recorded is not None and ds.classes != recorded["classes"]:
        only_here = sorted(set(ds.classes) - set(recorded["classes"]))
        only_there = sorted(set(recorded["classes"]) - set(ds.classes))
        raise UserError(f"data_dir {args.data_dir} holds other classes than {source} was trained on (only in "
                        f"the data: {_short(only_here)}; only in the checkpoint: {_short(only_there)})")
    train_x, train_y, val_x, val_y = split_val(ds.train_x, ds.train_y, args.val_split, args.seed)
    if len(train_x) == 0:
        raise UserError(f"--data_dir {args.data_dir}: no training images left after --val_split")
    if recorded is not None:
        mean, std = recorded["mean"], recorded["std"]
    else:
        mean, std = channel_stats(train_x)
        if bool((std <= MIN_STD * 1.001).all()) and ctx.is_main:  # a data problem, said as one, not a NaN later
            print(f"warning: every training image of {args.data_dir} is one flat colour (no channel varies): "
                  f"nothing to learn from the pixels", file=sys.stderr, flush=True)
    pipeline = make_pipeline(resize, mean, std, ds.classes, augment)
    bs = bs or args.bs
    common = dict(device=ctx.device, mean=pipeline["mean"], std=pipeline["std"], rank=ctx.rank,
                  world_size=ctx.world_size, channels_last=ctx.amp)
    test = BatchLoader(ds.test_x, ds.test_y, bs, train=False, **common)
    val = BatchLoader(val_x, val_y, bs, train=False, **common) if len(val_x) else None
    return Data(train=BatchLoader(train_x, train_y, bs, train=True, seed=args.seed, augment=augment, **common),
                plain_train=BatchLoader(train_x, train_y, bs, train=True, augment=False, seed=args.seed, **common),
                eval=val or test, test=test, num_classes=len(ds.classes), image_size=resize,
                eval_name="val" if val else "test", pipeline=pipeline)


def _short(names, limit=3):
    if not names:
        return "none (same names, other order)"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@torch.no_grad()
def smallest_bn_map(model, image_size):
    """(pixels, name) of the smallest feature map any BatchNorm of `model` normalises, for images of
    image_size x image_size (one probe forward, every block and switch run)."""
    model = getattr(model, "module", model)
    seen = {}
    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].shape[2:].numel()
        return hook
    hooks = [m.register_forward_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    training, execution = model.training, model.execution
    try:
        model.eval()
        model.execution = "mask"
        device = next(model.parameters()).device
        model(torch.zeros(1, model.arch.get("in_channels", 3), image_size, image_size, device=device), "hard")
    finally:
        model.train(training)
        model.execution = execution
        for h in hooks:
            h.remove()
    name = min(seen, key=seen.get)
    return seen[name], name


def check_batch_shapes(model, image_size, bs):
    """UserError, before any work, if training batches of `bs` images would hand a BatchNorm a single
    value per channel (1x1 maps, e.g. the ff switches' stride-2 conv late in a deep net at a small image
    size): one value has no variance to normalise by, and PyTorch stops mid-run."""
    pixels, name = smallest_bn_map(model, image_size)
    if bs * pixels >= 2:
        return
    fix = next(s for s in range(image_size + 1, 64 * image_size) if smallest_bn_map(model, s)[0] >= 2)
    raise UserError(f"bs {bs} at resize {image_size}: in training, BatchNorm {name} of this network would see "
                    f"one value per channel (1x1 maps); use bs 2 or more, or resize {fix} or more")


def check_result_dir(path):
    """--result_dir must be (or be creatable as) a writable directory; checked before anything is written."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise UserError(f"--result_dir {path} exists and is not a directory")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--result_dir {path} is not writable")


class StageRun:
    """The files of one stage under <result_dir>/<name>/: checkpoint.pt, metrics.json, tb/."""

    def __init__(self, name, result_dir, ctx):
        self.name, self.ctx = name, ctx
        self.dir = os.path.join(result_dir, name)
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.json")
        self.logger = None
        self.pipeline = None

    def open(self, pipeline=None):
        """Create the stage's folder and TensorBoard writer. Call only once all input has been checked.
        `pipeline` (Data.pipeline) goes into every checkpoint."""
        self.pipeline = pipeline
        if self.ctx.is_main:
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create {self.dir}: {e.strerror}") from None
        self.logger = Logger(os.path.join(self.dir, "tb"), enabled=self.ctx.is_main)
        return self

    def save(self, payload):
        if self.ctx.is_main:
            record = {"pipeline": self.pipeline} if self.pipeline is not None else {}
            save_checkpoint(self.checkpoint_path, {"stage": self.name, **record, **payload})
        barrier()
        kill_point("saved", payload.get("epoch"))

    def fit(self, *, model, ddp, data, optimizer, scheduler, step_fn, epochs, start_epoch, costs, payload,
            log_offset=0):
        """The epoch loop. `payload(epoch)` returns the checkpoint dict of the stage's state after `epoch`
        epochs (arch, model, optimizer ... are filled in here). Returns the last evaluation."""
        def checkpoint(epoch):
            return {"arch": model.arch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None, "epoch": epoch,
                    "rng": rng_state(), **payload(epoch)}

        ev = None
        if start_epoch >= epochs:  # nothing to train in this call: still leave this stage's checkpoint
            self.save(checkpoint(max(start_epoch, epochs)))
        for epoch in range(start_epoch, epochs):
            seed_epoch(self.ctx, epoch)
            data.train.set_epoch(epoch)
            t0 = time.time()
            tr = train_epoch(ddp, data.train, optimizer, scheduler, step_fn, self.ctx, epoch=epoch,
                             desc=f"{self.name} epoch")
            ev = evaluate(ddp, data.eval, self.ctx, costs, desc=data.eval_name)
            lr = optimizer.param_groups[0]["lr"]
            if self.ctx.is_main:
                print(summary_line(self.name, epoch + 1, epochs, tr, ev, time.time() - t0, lr), flush=True)
            step = log_offset + epoch + 1
            self.logger.scalars("train", tr, step)
            self.logger.scalars(data.eval_name, ev, step)
            self.logger.scalars("train", {"lr": lr, "epoch_seconds": time.time() - t0}, step)
            self.save(checkpoint(epoch + 1))
        return ev

    def finish(self, model, ddp, data, costs, extra=None):
        """Final test evaluation of the model the stage ends with -> metrics.json and TensorBoard.
        Returns the metrics dict."""
        test = evaluate(ddp, data.test, self.ctx, costs, desc="test")
        metrics = {"stage": self.name, "test_acc": test["acc"], "test_loss": test["loss"],
                   "gflops_per_image": test["gflops"], "exec_rate": test["exec_rate"],
                   "params": count_params(model), "test_images": test["images"], **(extra or {})}
        if self.ctx.is_main:
            write_json(self.metrics_path, metrics)
            print(f"[{self.name}] test acc {metrics['test_acc']:.2f}%  {metrics['gflops_per_image']:.4f} "
                  f"GFLOPs/image  {metrics['params'] / 1e6:.3f} M params  -> {self.metrics_path}", flush=True)
        if self.logger:
            self.logger.scalars("test", {k: metrics[k] for k in ("test_acc", "gflops_per_image", "params")}, 0)
            self.logger.close()
        return metrics


def resume_path(arg, run):
    """--resume with no path means this stage's own checkpoint in --result_dir."""
    return run.checkpoint_path if arg == "auto" else arg


def restore_training_state(ckpt, optimizer, scheduler):
    """Optimizer / scheduler / RNG state of a checkpoint (the model is rebuilt by the caller)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint's optimizer state does not fit this run ({str(e)[:120]})") from None
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
    return int(ckpt.get("epoch", 0))
