"""What every stage does around its own algorithm: guard --result_dir and the batch shapes, run the shared
epoch loop with a checkpoint per epoch, resume (one path for the three stages), and write metrics.json.
The stages (stages/) only add their settings, their model and their step function (the data:
utils.data.load_data)."""
import dataclasses
import os
import socket
import time

import torch

from runtime.checkpoint import load_checkpoint, save_checkpoint, stage_checkpoint
from runtime.evaluate import evaluate
from runtime.loop import seed_epoch, summary_line, train_epoch
from utils.dist import barrier, exact_fp32, peak_memory, setup
from utils.errors import UserError
from utils.faults import kill_point
from utils.files import write_json
from utils.flops import count_params, probe
from utils.lineage import STAGES, check_chain, check_parent_fits, file_sha256, guard_rerun, parent_record
from utils.log import Logger
from utils.nets import unwrap


@torch.no_grad()
def smallest_bn_map(model, image_size):
    """(pixels, name) of the smallest feature map any BatchNorm of `model` normalises, for images of
    image_size x image_size (one probe forward, every block and switch run)."""
    model = unwrap(model)
    seen = {}
    probe(model, image_size, [(n, m) for n, m in model.named_modules()
                              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)],
          lambda name, m, inputs, output: seen.__setitem__(name, inputs[0].shape[2:].numel()))
    name = min(seen, key=seen.get)
    return seen[name], name


def check_batch_shapes(model, image_size, bs, resize_fixed=False):
    """UserError, before any work, if training batches of `bs` images would hand a BatchNorm a single
    value per channel (1x1 maps, e.g. the ff switches' stride-2 conv late in a deep net at a small image
    size): one value has no variance to normalise by, and PyTorch stops mid-run.
    resize_fixed: the resize comes from a checkpoint (stages 2 and 3), so only the batch size is suggested."""
    pixels, name = smallest_bn_map(model, image_size)
    if bs * pixels >= 2:
        return
    problem = (f"bs {bs} at resize {image_size}: in training, BatchNorm {name} of this network would see "
               f"one value per channel (1x1 maps)")
    if resize_fixed:
        raise UserError(f"{problem}; use bs 2 or more (the resize is the checkpoint's)")
    fix = next(s for s in range(image_size + 1, 64 * image_size) if smallest_bn_map(model, s)[0] >= 2)
    raise UserError(f"{problem}; use bs 2 or more, or resize {fix} or more")


# What a stage adds below --result_dir at most: stale-<time>-<n>/<stage>/tb/run-<time>-<pid>/ and TensorBoard's
# events.out.tfevents.<time>.<host>.<pid>.<n> (the host name's length added where it is checked)
DEEPEST = len("/stale-20240101-000000-99/prune/tb/run-20240101-000000-4194304"
              "/events.out.tfevents.1700000000..4194304.99")


def check_result_dir(path):
    """--result_dir must be (or be creatable as) a writable directory whose files the file system can name:
    checked before anything is written, not half-way through creating the folders."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"--result_dir {path} exists and is not a directory")
    probe, missing = full, []
    while not os.path.exists(probe):
        probe, name = os.path.dirname(probe), os.path.basename(probe)
        missing.append(name)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--result_dir {path} is not writable")
    name_max, path_max = (_pathconf(probe, key, default) for key, default in
                          (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)))
    long = [name for name in missing if len(os.fsencode(name)) > name_max]
    if long:
        raise UserError(f"--result_dir {path}: its folder name {long[-1][:40]}... is {len(os.fsencode(long[-1]))} "
                        f"bytes long, and this file system allows {name_max}")
    need = len(os.fsencode(full)) + DEEPEST + len(socket.gethostname())
    if need >= path_max:
        raise UserError(f"--result_dir {path} is too long: the stages' files below it would need paths of "
                        f"{need} bytes, and this system allows {path_max - 1}")


def _pathconf(path, key, default):
    try:
        value = os.pathconf(path, key)
    except (OSError, ValueError):  # not reported by this system or file system
        return default
    return value if value > 0 else float("inf")  # -1: no limit


class StageRun:
    """The files of one stage under <result_dir>/<name>/: checkpoint.pt, metrics.json, tb/<run>/ (TensorBoard's
    steps count on from the stage before: docs/stages.md)."""

    def __init__(self, name, s):
        """Stage `name`'s run with settings `s`: result_dir checked, then device, process group, seeds, numerics."""
        check_result_dir(s.result_dir)
        self.ctx = setup(s.device, s.seed, s.amp, s.channels_last, s.tf32)
        self.name, self.result_dir, self.overwrite = name, s.result_dir, s.overwrite
        self.dir = os.path.join(s.result_dir, name)
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.json")
        self.logger = self.pipeline = self.run_id = self.parent = None  # parent: utils/lineage.py's record
        self.step_offset = self.last_step = 0   # step_offset: TensorBoard steps of the stages before this one

    def open(self, pipeline=None, *, parent=None, resumed=None, start_step=0):
        """Create the stage's folder (earlier results there moved aside or refused: utils.lineage.guard_rerun)
        and TensorBoard writer, once all input has been checked. `resumed`: the checkpoint a --resume continues
        (its run folder and step offset kept); `start_step`: the parent's last TensorBoard step."""
        guard_rerun(self.result_dir, self.name, self.overwrite, self.ctx.is_main, resuming=resumed is not None)
        kept = resumed or {}
        self.pipeline, self.parent = pipeline, kept.get("parent", parent)
        self.step_offset = self.last_step = start_step if resumed is None else kept.get("step_offset", 0)
        self.run_id = kept.get("run_id") or time.strftime("run-%Y%m%d-%H%M%S-") + f"{os.getpid()}"
        if resumed is not None and self.ctx.is_main:
            where = f"round {resumed['round'] + 1}, " if isinstance(resumed.get("round"), int) else ""
            print(f"[{self.name}] resuming from {where}epoch {int(resumed.get('epoch', 0))}", flush=True)
        if self.ctx.is_main:
            try:
                os.makedirs(self.dir, exist_ok=True)
                if resumed is None and os.path.exists(self.metrics_path):
                    # a fresh run: the old numbers no longer describe this folder's checkpoint
                    os.replace(self.metrics_path, self.metrics_path + ".replaced")
            except OSError as e:
                raise UserError(f"cannot create {self.dir}: {e.strerror}") from None
        self.logger = Logger(os.path.join(self.dir, "tb", self.run_id), enabled=self.ctx.is_main)
        return self

    def save(self, model, optimizer, scheduler, epoch, own):
        """Write the checkpoint after `epoch` epochs with `own`, the stage's own keys (rank 0; every rank waits)."""
        if self.ctx.is_main:
            own = {**own, "world_size": self.ctx.world_size}  # processes training it: resume checks it
            lineage = {"run_id": self.run_id, "parent": self.parent, "step_offset": self.step_offset,
                       "tb_step": self.last_step}  # where the network comes from
            save_checkpoint(self.checkpoint_path, stage_checkpoint(self.name, self.pipeline, lineage, model,
                                                                   optimizer, scheduler, epoch, own))
        barrier()
        kill_point("saved", epoch)

    def fit(self, *, model, ddp, data, optimizer, scheduler, step_fn, epochs, start_epoch, costs, own_state,
            log_offset=0, evals=(("routed", "hard"),), total_epochs=None):
        """The epoch loop, a checkpoint per epoch (`own_state()`: the stage's own keys, read at every save). After
        every epoch the network is evaluated in each of `evals` ((name, mode)), the first in the summary line.
        Epochs are shown out of total_epochs (default `epochs`), so that a stage calling fit twice (stage 1's
        dense epochs, then the supervised phase) counts on. Returns the last evaluations."""
        total = total_epochs or epochs
        evs = None
        if start_epoch >= epochs:  # nothing to train in this call: still leave this stage's checkpoint
            self.last_step = max(self.last_step, self.step_offset + log_offset + epochs)
            self.save(model, optimizer, scheduler, max(start_epoch, epochs), own_state())
        for epoch in range(start_epoch, epochs):
            seed_epoch(self.ctx, epoch)
            data.train.set_epoch(epoch)
            t0 = time.time()
            tr = train_epoch(ddp, data.train, optimizer, scheduler, step_fn, self.ctx, epoch=epoch,
                             desc=f"{self.name} epoch")
            # On a GPU per-epoch evaluation masks instead of skipping (the same decisions and GFLOPs, no host
            # sync per gated block); on the CPU skipping is the faster. The final numbers (finish) skip.
            execution = "mask" if self.ctx.device.type == "cuda" else None
            evs = {name: evaluate(ddp, data.eval, self.ctx, costs, mode=mode, desc=f"{data.eval_name} {name}",
                                  execution=execution) for name, mode in evals}
            lr = optimizer.param_groups[0]["lr"]
            first = evals[0][0]
            if self.ctx.is_main:
                shown = log_offset + epoch + 1 if total_epochs else epoch + 1  # stage 2's rounds count on
                print(summary_line(self.name, shown, total, tr, evs[first], time.time() - t0, lr, first),
                      flush=True)
            self.last_step = step = self.step_offset + log_offset + epoch + 1
            self.logger.scalars(f"{self.name}/train", tr, step)
            for name, mode in evals:  # in open mode GFLOPs and execution rates are constants: no curves
                keys = ("acc", "loss") if mode == "open" else ("acc", "loss", "gflops", "exec_rate")
                self.logger.scalars(f"{self.name}/{data.eval_name}_{name}", {k: evs[name][k] for k in keys}, step)
            self.logger.scalars(f"{self.name}/train", {"lr": lr, "epoch_seconds": time.time() - t0}, step)
            self.save(model, optimizer, scheduler, epoch + 1, own_state())
        return evs

    def finish(self, model, ddp, data, costs, extra=None, mode="hard", routes="routed"):
        """Final evaluation on the --final_split (val: no test number is computed) of the model exactly as
        saved -> metrics.json (<split>_acc, gflops_per_image ..., the lineage) and TensorBoard at the stage's last
        step. Mode "open" (rows 1 and 2): every block, no switch, the greedy routes beside it as routed_*
        (TensorBoard: `routes`_acc and `routes`_gflops, stage 1 naming its re-spread switches so)."""
        split = data.final_name
        loader = data.test if split == "test" else data.eval
        # float32 and TF32 off whatever training allowed: the numbers are the saved (float32) model's, as deployed
        exact = dataclasses.replace(self.ctx, amp=False)
        with exact_fp32():
            final = evaluate(ddp, loader, exact, costs, mode=mode, desc=split)
            routed = evaluate(ddp, loader, exact, costs, desc=f"{split} routed") if mode == "open" else None
        metrics = {"stage": self.name, f"{split}_acc": final["acc"], f"{split}_loss": final["loss"],
                   "gflops_per_image": final["gflops"], "exec_rate": final["exec_rate"], "mode": mode,
                   "params": count_params(model), f"{split}_images": final["images"], "final_split": split,
                   **({} if split == "test" else {f"{split}_gflops": final["gflops"]})}
        if routed is not None:
            metrics.update(routed_acc=routed["acc"], routed_gflops=routed["gflops"], exec_rate=routed["exec_rate"])
        metrics["precision"] = {"training": {"amp": "bf16" if self.ctx.amp else "off", "tf32": self.ctx.tf32,
                                             "channels_last": self.ctx.channels_last},
                                "final_evaluation": "float32, TF32 off"}
        metrics["peak_memory"] = peak_memory(self.ctx.device)
        metrics.update(extra or {}, parent=self.parent, run_id=self.run_id, tb_step=self.last_step)
        if self.ctx.is_main:
            metrics["checkpoint_sha256"] = file_sha256(self.checkpoint_path)
            write_json(self.metrics_path, metrics)
            print(f"[{self.name}] {split} acc {metrics[f'{split}_acc']:.2f}%  {metrics['gflops_per_image']:.4f} "
                  f"GFLOPs/image  {metrics['params'] / 1e6:.3f} M params  -> {self.metrics_path}", flush=True)
        if self.logger:
            final_tags = {f"{split}_acc": metrics[f"{split}_acc"], "gflops_per_image": metrics["gflops_per_image"],
                          "params": metrics["params"]}
            if mode == "open":
                final_tags.update({f"{routes}_acc": metrics["routed_acc"],
                                   f"{routes}_gflops": metrics["routed_gflops"]})
            self.logger.scalars(f"{self.name}/final_{split}", final_tags, self.last_step)
            self.logger.close()
        return metrics


def starting_checkpoint(given, result_dir, stages, flag, missing, lineage=True):
    """(path, checkpoint, lineage record or None) a stage starts from: `given` (which must be the network
    result_dir holds of its stage, if any), else the first of `stages` whose checkpoint is in result_dir
    (refused with the line `missing` when there is none, or when result_dir's chain does not hold)."""
    path = given or next((p for p in (os.path.join(result_dir, s, "checkpoint.pt") for s in stages)
                          if os.path.isfile(p)), None)
    if path is None:
        raise UserError(missing)
    if not given:  # the network of this --result_dir's chain, which must hold
        check_chain(result_dir, tuple(s for s in STAGES if s in stages))
    ckpt = load_checkpoint(path, stages, flag)
    parent = parent_record(ckpt["stage"], path) if lineage else None
    if given and lineage:
        check_parent_fits(result_dir, parent, flag)
    return path, ckpt, parent


def resume(run, resume, ctx, settings=None, source=None):
    """The one resume path of the three stages -> (checkpoint, path) of `resume` (a path, or "auto" / True: this
    stage's own), refused in one line when it is not this stage's, or was trained by another number of
    processes, under other `settings` (None: the stage checks its own), or from another network than its source
    (`source(checkpoint)`: {"stage", "path"}) holds now."""
    path = run.checkpoint_path if resume in ("auto", True) else resume
    ckpt = load_checkpoint(path, (run.name,), "--resume")
    if settings is not None:
        check_resume_args(ckpt, settings, path)
    recorded = ckpt.get("world_size")  # another number of processes: other steps per epoch, another schedule
    if recorded is not None and recorded != ctx.world_size:
        raise UserError(f"--resume {path}: the run was started with {recorded} process(es), this one has "
                        f"{ctx.world_size}; the global batch and the schedule depend on it: resume with "
                        f"{recorded} (torchrun --nproc_per_node), or start a new run")
    began, began_from = source(ckpt) if source else {}, (ckpt.get("parent") or {}).get("sha256")
    if began_from and os.path.isfile(began.get("path") or "") \
            and began_from != parent_record(began["stage"], began["path"])["sha256"]:
        raise UserError(f"--resume {path}: began from another network than {began['path']} holds now (stage "
                        f"{STAGES[began['stage']].number} was rerun since); start stage {STAGES[run.name].number} "
                        f"afresh")
    return ckpt, path


# Settings that say where a run runs, not what it computes: a search's trial does not record them
WHERE = ("result_dir", "checkpoint", "data_dir", "num_workers", "device", "resume", "overwrite")
# Settings a resumed run may change: WHERE and how fast it runs (the network's own are checked against its
# architecture, the resize against its recorded pipeline, with their own messages)
RESUME_FREE = {*WHERE, "compile", "amp", "channels_last", "tf32", "download", "pretrained", "resize", "network",
               "depth", "width", "gate"}


def check_resume_args(ckpt, settings, path):
    """Refused when a setting that shapes the training differs from the one the resumed run was started with:
    the result would be neither run, recorded as the new."""
    recorded = ckpt.get("args") or {}
    # --epochs may grow: the run goes on to the new count, its schedule continuing as the longer run's from
    # the step reached (a cosine then resumes where that run's curve is at this step)
    grows = lambda k, v: k == "epochs" and isinstance(v, int) and isinstance(recorded[k], int) and v >= recorded[k]
    differ = [f"--{k} {recorded[k]!r} -> {v!r}" for k, v in sorted(dataclasses.asdict(settings).items())
              if k not in RESUME_FREE and k in recorded and recorded[k] != v and not grows(k, v)]
    if differ:
        raise UserError(f"--resume {path}: the run was started with other training flags ({', '.join(differ)}); "
                        f"resume with the same flags (--epochs may only grow), or start a new run")


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
