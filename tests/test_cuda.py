"""Every way of starting a stage on a CUDA machine, run on this CPU-only one: the CUDA API answers as torch
2.14's does (torch.cuda.set_device itself runs and refuses a device without index; only the driver call
under it is recorded), the process group is recorded, not joined, DDP is recorded, not built, and every
tensor sent to or created on a GPU stays on the CPU with its target recorded. Each run stops after its
first training step. Then the precision and memory format as a choice of the run, on the CPU."""
import json
import math

import pytest
import torch
import torch.distributed
from torch.overrides import TorchFunctionMode

import main_prune
import main_rl_prune
import main_search
import main_sp
import runtime.loop
import runtime.stage
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from utils.dist import Context, setup
from utils.errors import UserError, run_main
from utils.nets import unwrap

ARCH = ["--depth", "8", "--width", "1"]
SMALL = ["--bs", "16", "--num_workers", "0", "--resize", "16"]
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class Stop(Exception):
    """Raised after the first training step: the run got there."""


class OnCpu(TorchFunctionMode):
    """Keeps every tensor on the CPU: a CUDA device given to a torch function or tensor method (factories'
    device=, Tensor.to(device)) is replaced by cpu and recorded; `placed` maps id(tensor) -> the GPU that
    Tensor.to sent it to (a module's parameters keep their identity through Module.to)."""

    def __init__(self):
        super().__init__()
        self.targets, self.placed = set(), {}

    def _cpu(self, value):
        if isinstance(value, str) and value.startswith("cuda"):
            value = torch.device(value)
        if isinstance(value, torch.device) and value.type == "cuda":
            self.targets.add(str(value))
            return torch.device("cpu"), str(value)
        return value, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.device, torch._C._nn._parse_to):  # naming a GPU moves nothing (Module.to parses first)
            return func(*args, **(kwargs or {}))
        args, kwargs, target = list(args), dict(kwargs or {}), None
        for i, value in enumerate(args):
            args[i], t = self._cpu(value)
            target = target or t
        if "device" in kwargs:
            kwargs["device"], t = self._cpu(kwargs["device"])
            target = target or t
        out = func(*args, **kwargs)
        if target and getattr(func, "__name__", None) == "to":  # Tensor.to, under any of its names
            self.placed[id(args[0])] = target
        return out


class FakeGpus:
    """`count` CUDA GPUs as torch 2.14 shows them, the torchrun environment `env`, and the first training
    step of any stage recorded (then Stop)."""

    def __init__(self, monkeypatch, count, env=None):
        self.count, self.selected, self.groups, self.ddp, self.step = count, [], [], [], None
        self.mode = OnCpu()
        for key in TORCHRUN:
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, str(value))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
        monkeypatch.setattr(torch._C, "_cuda_setDevice", self._select)  # under the real, strict set_device
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
        monkeypatch.setattr(torch.distributed, "init_process_group",
                            lambda backend=None, **kw: self.groups.append((backend, kw)))
        monkeypatch.setattr(runtime.loop, "DistributedDataParallel", self._ddp)
        self._real_train_epoch = runtime.stage.train_epoch
        monkeypatch.setattr(runtime.stage, "train_epoch", self._train_epoch)

    def _select(self, index):
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.selected.append(index)

    def _ddp(self, model, device_ids=None, **kw):
        self.ddp.append(device_ids)
        return model

    def _train_epoch(self, ddp, loader, *args, **kwargs):
        """Record where the model and the batches live, run one real step, stop."""
        model = unwrap(ddp)
        ctx = args[3] if len(args) > 3 else kwargs["ctx"]  # (optimizer, scheduler, step_fn, ctx)
        self.step = {"ctx": str(ctx.device), "amp": ctx.amp, "loader": str(loader.device),
                     "batches": self.mode.placed.get(id(loader.x)),
                     "params": {self.mode.placed.get(id(p)) for p in model.parameters()}}

        def one_batch():
            yield next(iter(loader))
            raise Stop

        proxy = type("OneBatch", (), {"__iter__": lambda s: one_batch(), "__len__": lambda s: len(loader)})()
        return self._real_train_epoch(ddp, proxy, *args, **kwargs)

    def run(self, main, argv):
        with pytest.raises(Stop), self.mode:
            main(argv)
        return self

    def check(self, index, processes=1):
        gpu = f"cuda:{index}"
        assert self.step is not None, "training was not reached"
        assert self.step == {"ctx": gpu, "amp": True, "loader": gpu, "batches": gpu, "params": {gpu}}, self.step
        assert self.mode.targets == {gpu}, self.mode.targets  # nothing sent to another GPU
        assert self.selected and set(self.selected) == {index}, self.selected
        if processes > 1:
            assert self.groups == [("nccl", {"device_id": torch.device(gpu)})], self.groups
            assert self.ddp and all(ids == [index] for ids in self.ddp), self.ddp
        else:
            assert self.groups == [] and self.ddp == []


def torchrun(processes, rank):
    return {"RANK": rank, "WORLD_SIZE": processes, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": processes}


# (device flag, GPUs visible, torchrun environment, expected index, processes)
STARTS = {
    "no --device": (None, 1, None, 0, 1),
    "--device cuda": ("cuda", 1, None, 0, 1),
    "--device cuda:0": ("cuda:0", 1, None, 0, 1),
    "--device cuda:1 of 2": ("cuda:1", 2, None, 1, 1),
    "torchrun 1 process": (None, 1, torchrun(1, 0), 0, 1),
    "torchrun 1 process, cuda:1": ("cuda:1", 2, torchrun(1, 0), 1, 1),
    "torchrun 2 processes, rank 1": (None, 2, torchrun(2, 1), 1, 2),
    "torchrun 2 processes, rank 1, --device cuda": ("cuda", 2, torchrun(2, 1), 1, 2),
}


@pytest.fixture(scope="module")
def runs(trained_stage1):
    """A tiny dataset and a real (CPU) stage-1 run with a validation split (the search needs one): the
    session's (conftest.trained_stage1), its checkpoint at root/base/sp/checkpoint.pt; read only."""
    root, data, _ = trained_stage1
    return root, data


def device_flag(device):
    return ["--device", device] if device else []


@pytest.mark.slow
@pytest.mark.parametrize("start", list(STARTS))
def test_stage1_reaches_training_on_the_right_gpu(runs, tmp_path, monkeypatch, start):
    device, count, env, index, processes = STARTS[start]
    root, data = runs
    gpus = FakeGpus(monkeypatch, count, env)
    gpus.run(main_sp.main, [*ARCH, *SMALL, "--epochs", "1", "--data_dir", data, "--result_dir", str(tmp_path),
                            *device_flag(device)])
    gpus.check(index, processes)


def write_config(path, root, data, **keys):
    config = {"result_dir": str(path.parent / "results"), "data_dir": data, "num_workers": 0, "bs": 16,
              "checkpoint": str(root / "base" / "sp" / "checkpoint.pt"), "compression": 0.3, "epochs": 1,
              "fisher_batches": 2, "criterion": "score", **keys}
    path.write_text(json.dumps(config))
    return str(path)


PRUNE_STARTS = {  # (config's device key (absent: "-"), --device flag, GPUs, torchrun, index, processes)
    "config device null": (None, None, 1, None, 0, 1),
    "config device absent": ("-", None, 1, None, 0, 1),
    "config device cuda": ("cuda", None, 1, None, 0, 1),
    "config cpu, --device cuda:0": ("cpu", "cuda:0", 1, None, 0, 1),
    "torchrun 2 processes, rank 1": (None, None, 2, torchrun(2, 1), 1, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("start", list(PRUNE_STARTS))
def test_stage2_reaches_fine_tuning_on_the_right_gpu(runs, tmp_path, monkeypatch, start):
    key, flag, count, env, index, processes = PRUNE_STARTS[start]
    root, data = runs
    config = write_config(tmp_path / "config.json", root, data, **({} if key == "-" else {"device": key}))
    gpus = FakeGpus(monkeypatch, count, env)
    gpus.run(main_prune.main, ["--config_path", config, *device_flag(flag)])
    gpus.check(index, processes)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["no --device", "--device cuda:0", "torchrun 2 processes, rank 1"])
def test_stage3_reaches_training_on_the_right_gpu(runs, tmp_path, monkeypatch, start):
    device, count, env, index, processes = STARTS[start]
    root, data = runs
    gpus = FakeGpus(monkeypatch, count, env)
    gpus.run(main_rl_prune.main, ["--checkpoint", str(root / "base" / "sp" / "checkpoint.pt"), *SMALL,
                                  "--epochs", "1", "--data_dir", data, "--result_dir", str(tmp_path),
                                  *device_flag(device)])
    gpus.check(index, processes)


@pytest.mark.slow
@pytest.mark.parametrize("device", [None, "cuda"])
def test_search_reaches_its_first_trial_on_the_gpu(runs, tmp_path, monkeypatch, device):
    """The search's own evaluation (the unpruned baseline) and its first stage-2 trial, on cuda:0."""
    root, data = runs
    prune = tmp_path / "prune.json"
    prune.write_text(json.dumps({"epochs": 1, "lr": 0.01, "bs": 16, "fisher_batches": 2, "criterion": "score"}))
    gpus = FakeGpus(monkeypatch, 1)
    gpus.run(main_search.main, ["--result_dir", str(tmp_path), "--checkpoint",
                                str(root / "base" / "sp" / "checkpoint.pt"), "--prune_config", str(prune),
                                "--min_compression", "0.3", "--max_compression", "0.3", "--rl_epochs", "1",
                                "--rl_bs", "16", *device_flag(device)])
    gpus.check(0)


def test_the_stub_set_device_is_as_strict_as_torchs(monkeypatch):
    gpus = FakeGpus(monkeypatch, 2)
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device(torch.device("cuda"))
    torch.cuda.set_device(torch.device("cuda", 1))
    assert gpus.selected == [1]


def one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


BAD = [  # (flags, GPUs (0: none, the real CPU-only machine), torchrun, words of the one line)
    (["--device", "gpu"], 1, None, ["gpu", "cpu, cuda or cuda:N"]),
    (["--device", "cuda:x"], 1, None, ["cuda:x"]),
    (["--device", "mps"], 1, None, ["mps"]),
    (["--device", ""], 1, None, ["--device is empty"]),
    (["--device", "cuda:7"], 1, None, ["cuda:7", "1 CUDA GPU"]),
    (["--device", "cuda"], 0, None, ["no CUDA GPU"]),
    (["--device", "cuda:0"], 0, None, ["no CUDA GPU"]),
    (["--device", "cuda:0"], 2, torchrun(2, 1), ["cuda:0", "torchrun", "--device cuda"]),
    ([], 1, torchrun(2, 1), ["2 processes", "1 CUDA GPU"]),
    (["--amp", "fp16"], 1, None, ["--amp", "fp16"]),
    (["--channels_last", "yes"], 1, None, ["yes"]),
]


@pytest.mark.parametrize("flags, count, env, words", BAD, ids=[" ".join(b[0]) or "no flag" for b in BAD])
def test_bad_device_or_numerics_is_one_line_exit_2(runs, tmp_path, monkeypatch, capsys, flags, count, env, words):
    root, data = runs
    if count:
        FakeGpus(monkeypatch, count, env)
    results = tmp_path / "results"
    err = one_line_error(capsys, main_sp.main, [*ARCH, *SMALL, "--data_dir", data, "--result_dir", str(results),
                                                *flags])
    for word in words:
        assert word.lower() in err.lower(), (word, err)
    assert not results.exists()


@pytest.mark.parametrize("keys, words", [({"device": "gpu"}, ["gpu"]), ({"amp": "fp16"}, ["amp", "bf16, off"]),
                                         ({"channels_last": "yes"}, ["channels_last", "true/false"])])
def test_bad_config_device_or_numerics_is_one_line_exit_2(runs, tmp_path, capsys, keys, words):
    root, data = runs
    err = one_line_error(capsys, main_prune.main, ["--config_path", write_config(tmp_path / "c.json", root, data,
                                                                                 **keys)])
    for word in words:
        assert word.lower() in err.lower(), (word, err)


def test_numerics_follow_the_device_unless_chosen(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    ctx = setup("cpu")
    assert (ctx.amp, ctx.channels_last) == (False, False)
    ctx = setup("cpu", amp="bf16", channels_last=True)
    assert (ctx.amp, ctx.channels_last) == (True, True)
    assert Context(device=torch.device("cuda", 0)).amp and Context(device=torch.device("cuda", 0)).channels_last
    FakeGpus(monkeypatch, 1)
    ctx = setup()
    assert (str(ctx.device), ctx.amp, ctx.channels_last) == ("cuda:0", True, True)
    ctx = setup("cuda", amp="off", channels_last=False)
    assert (str(ctx.device), ctx.amp, ctx.channels_last) == ("cuda:0", False, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU
    assert setup("cuda").amp is False
    with pytest.raises(UserError, match="bfloat16"):
        setup("cuda", amp="bf16")


def record_step(monkeypatch):
    """Runs one real training step, recording the output dtype of every convolution and the layout of the
    batch and of the convolution weights, then Stop."""
    seen = {"conv": set(), "batch_channels_last": None, "weights_channels_last": None}
    real = runtime.stage.train_epoch

    def train_epoch(ddp, loader, *args, **kwargs):
        model = unwrap(ddp)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        hooks = [m.register_forward_hook(lambda m, i, o: seen["conv"].add(o.dtype)) for m in convs]
        seen["weights_channels_last"] = all(m.weight.is_contiguous(memory_format=torch.channels_last)
                                            for m in convs if m.weight.shape[-1] > 1)

        def one_batch():
            x, y = next(iter(loader))
            seen["batch_channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
            yield x, y
            raise Stop

        proxy = type("OneBatch", (), {"__iter__": lambda s: one_batch(), "__len__": lambda s: len(loader)})()
        try:
            return real(ddp, proxy, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(runtime.stage, "train_epoch", train_epoch)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("flags, dtype, nhwc", [([], torch.float32, False),
                                                (["--amp", "bf16", "--channels_last"], torch.bfloat16, True),
                                                (["--amp", "bf16", "--no-channels_last"], torch.bfloat16, False),
                                                (["--amp", "off", "--channels_last"], torch.float32, True)])
def test_cpu_step_runs_in_the_chosen_precision_and_layout(runs, tmp_path, monkeypatch, flags, dtype, nhwc):
    root, data = runs
    seen = record_step(monkeypatch)
    with pytest.raises(Stop):
        main_sp.main([*ARCH, *SMALL, "--epochs", "1", "--device", "cpu", "--data_dir", data, "--result_dir",
                      str(tmp_path), *flags])
    assert seen["conv"] == {dtype}, seen
    assert seen["batch_channels_last"] is nhwc and seen["weights_channels_last"] is nhwc, seen


@pytest.mark.slow
def test_short_bf16_channels_last_run_on_cpu_is_finite_and_reloads_in_float32(runs, tmp_path, capsys):
    root, data = runs
    main_sp.main([*ARCH, *SMALL, "--epochs", "2", "--dense_epochs", "1", "--lr", "0.05", "--device", "cpu",
                  "--amp", "bf16", "--channels_last", "--data_dir", data, "--result_dir", str(tmp_path)])
    out = capsys.readouterr().out
    losses = [float(line.split("train loss ")[1].split()[0]) for line in out.splitlines() if "train loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), out
    metrics = json.load(open(tmp_path / "sp" / "metrics.json"))
    assert math.isfinite(metrics["test_loss"]) and metrics["test_images"] > 0
    path = str(tmp_path / "sp" / "checkpoint.pt")
    ckpt = load_checkpoint(path, ("sp",))
    assert ckpt["args"]["amp"] == "bf16" and ckpt["args"]["channels_last"] is True
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    model = model_from_checkpoint(ckpt, path).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        logits, _, _ = model(torch.randn(4, 3, 16, 16), "hard")
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ------------------------------------------------------------ a CUDA build without a usable GPU; TF32

def cuda_build_without_gpu(monkeypatch, why):
    """This torch as a CUDA 13.0 build on a machine whose driver refuses it with `why` (torch.cuda.init's
    words), torchrun's variables unset."""
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def init():
        raise RuntimeError(why)

    monkeypatch.setattr(torch.cuda, "init", init)


TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12040). Please update your GPU driver by "
           "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx")


def test_a_cuda_build_falling_back_to_the_cpu_says_so_in_one_line(runs, tmp_path, monkeypatch, capsys):
    import utils.dist
    cuda_build_without_gpu(monkeypatch, TOO_OLD)
    monkeypatch.setattr(utils.dist, "_WARNED", [])  # said once per process: this test's process starts afresh
    ctx = setup()
    setup()  # once per process (the search runs many stages in one)
    err = capsys.readouterr().err
    assert str(ctx.device) == "cpu" and len(err.splitlines()) == 1, err
    for words in ("warning", "CPU", "CUDA 13.0", "driver on your system is too old (found version 12040)",
                  "--device cpu"):
        assert words in err, (words, err)
    setup("cpu")  # asked for: nothing to say
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    setup()
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build expects no GPU
    setup()
    assert capsys.readouterr().err == ""
    # a stage says it before its work, once
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(utils.dist, "_WARNED", [])
    root, data = runs
    gpus_step = {}

    def first_step(ddp, loader, *args, **kwargs):
        gpus_step["device"] = str(loader.device)
        raise Stop

    monkeypatch.setattr(runtime.stage, "train_epoch", first_step)
    with pytest.raises(Stop):
        main_sp.main([*ARCH, *SMALL, "--epochs", "1", "--data_dir", data, "--result_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert gpus_step == {"device": "cpu"} and err.count("warning: running on the CPU") == 1, err
    # asked for explicitly, the missing driver is the one-line error's reason
    err = one_line_error(capsys, main_sp.main, [*ARCH, *SMALL, "--device", "cuda", "--data_dir", data,
                                                "--result_dir", str(tmp_path / "r")])
    assert "no CUDA GPU" in err and "too old" in err and "CUDA 13.0" in err, err


@pytest.fixture
def tf32_flags_restored():
    """The legacy TF32 flags put back after the test. Not through monkeypatch: torch's cuBLAS flag lives in
    its module's __getattr__, and pytest 9.2's undo deletes an attribute it found no instance entry for."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_switch_is_one_api_and_every_flag_reads_back(monkeypatch, tf32_flags_restored):
    """TF32 set through the legacy flags only: afterwards every flag of both APIs reads (inductor reads both;
    after the per-op API is used, reading a legacy one can raise), exact_fp32 turns both off inside and
    restores them, and setup turns TF32 off unless asked."""
    from utils.dist import exact_fp32, set_tf32, tf32_flags
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)

    def every_flag():
        return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
                torch.backends.cudnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                torch.get_float32_matmul_precision())

    for enabled in (True, False, True):
        set_tf32(enabled)
        flags = every_flag()
        assert flags[:2] == (enabled, enabled), flags
        assert flags[5] == ("tf32" if enabled else "ieee"), flags
        with exact_fp32():
            assert every_flag()[:2] == (False, False) and tf32_flags() == {
                "cudnn_allow_tf32": False, "cuda_matmul_allow_tf32": False}
        assert every_flag() == flags
    assert setup("cpu").tf32 is False and tf32_flags() == {"cudnn_allow_tf32": False, "cuda_matmul_allow_tf32": False}
    assert setup("cpu", tf32=True).tf32 is True and torch.backends.cudnn.allow_tf32


def record_tf32_by_phase(monkeypatch):
    """Every convolution's forward (a global module hook) records cuDNN's TF32 flag and the phase it ran in:
    the counterfactual pass, the final evaluation, or the training step."""
    import sys as _sys
    seen = {}
    phases = {"_flip_losses": "counterfactual", "finish": "final", "train_epoch": "training"}

    def hook(module, inputs, output):
        if not isinstance(module, torch.nn.Conv2d):
            return
        frame, phase = _sys._getframe(1), None
        while frame is not None and phase is None:
            phase = phases.get(frame.f_code.co_name)
            frame = frame.f_back
        if phase:
            seen.setdefault(phase, set()).add((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    return seen, handle


@pytest.mark.slow
@pytest.mark.parametrize("tf32", [False, True])
def test_final_numbers_and_counterfactual_losses_are_exact_float32(runs, tmp_path, monkeypatch, tf32,
                                                                   tf32_flags_restored):
    """cuDNN's float32 convolutions default to TF32. By default the whole run has TF32 off; --tf32 allows it in
    the training step only: the counterfactual losses and the final evaluation (metrics.json, "float32 as
    saved") run with TF32 off, and metrics.json records the training precision."""
    root, data = runs
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's own defaults
    seen, handle = record_tf32_by_phase(monkeypatch)
    try:
        main_rl_prune.main(["--checkpoint", str(root / "base" / "sp" / "checkpoint.pt"), *SMALL, "--epochs", "1",
                            "--device", "cpu", "--data_dir", data, "--result_dir", str(tmp_path),
                            *(["--tf32"] if tf32 else [])])
    finally:
        handle.remove()
    assert seen["training"] == {(tf32, tf32)}, seen
    assert seen["counterfactual"] == {(False, False)} and seen["final"] == {(False, False)}, seen
    metrics = json.load(open(tmp_path / "rl" / "metrics.json"))
    assert metrics["precision"] == {"training": {"amp": "off", "tf32": tf32, "channels_last": False},
                                    "final_evaluation": "float32, TF32 off"}
    assert metrics["peak_memory"]["host_peak_rss_gib"] > 0


def test_inference_that_skips_blocks_never_autotunes_cudnn_per_sub_batch(runs, monkeypatch):
    """A network that skips blocks runs them on sub-batches whose size changes with every batch: evaluation
    and the per-image pass (runtime/predict.py: the evaluation's, gpu_check's reload) turn cudnn.benchmark off
    while they skip, and leave it as it was; a dense pass (mode open) keeps it."""
    from runtime.checkpoint import load_model
    from runtime.evaluate import evaluate
    from runtime.predict import predict
    from utils.data import BatchLoader
    from utils.flops import measure_costs
    root, data = runs
    model, _ = load_model(str(root / "base" / "sp" / "checkpoint.pt"), "cpu")
    costs = measure_costs(model, 16)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as the stages set it on CUDA (restored after)
    seen = []
    hooks = [m.register_forward_hook(lambda *a: seen.append(torch.backends.cudnn.benchmark))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    loader = BatchLoader(torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8), torch.zeros(12, dtype=torch.long),
                         4, train=False, device="cpu", mean=[0.5] * 3, std=[0.25] * 3)
    for run, skipping in ((lambda: predict(model, loader), True),
                          (lambda: evaluate(model, loader, Context(device=torch.device("cpu")), costs, mode="hard"), True),
                          (lambda: predict(model, loader, mode="open"), False)):
        seen.clear()
        run()
        assert seen and set(seen) == {not skipping}, (skipping, set(seen))
        assert torch.backends.cudnn.benchmark is True
    for h in hooks:
        h.remove()
