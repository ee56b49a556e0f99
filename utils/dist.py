"""Device choice, float32 precision and torchrun/DistributedDataParallel set-up (PyTorch's own engine: nccl on
CUDA, gloo on CPU). Without torchrun every helper here is a no-op and the world has one rank."""
import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


PRECISIONS = ("bf16", "off")  # --amp / config "amp"; None: by device


@dataclass
class Context:
    """A run's device, rank and numerics (amp: bf16 autocast; tf32: the training step may use TF32, set_tf32);
    local_rank / local_world_size: this process among those torchrun started on its machine."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    amp: bool = None
    channels_last: bool = None
    tf32: bool = False
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self):
        on_gpu = self.device.type == "cuda"
        self.amp = on_gpu if self.amp is None else bool(self.amp)
        self.channels_last = on_gpu if self.channels_last is None else bool(self.channels_last)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def _env_int(name, default):
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def _parse_device(name):
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not a device (expected cpu, cuda or cuda:N)")
    return torch.device("cpu") if device.type == "cpu" else device


def cuda_missing():
    """Why this CUDA build of torch sees no GPU, in one line (None: a CPU build, which expects none): the
    driver's own message, or CUDA_VISIBLE_DEVICES hiding every GPU."""
    if not torch.version.cuda:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    try:
        torch.cuda.init()
    except Exception as e:  # torch's own words: "Found no NVIDIA driver ...", "The NVIDIA driver ... is too old ..."
        return " ".join(str(e).split(". ")[0].split()) or type(e).__name__
    return "no CUDA GPU is visible"


_WARNED = []  # the fallback is said once per process (the search runs many stages in one)


def set_tf32(enabled):
    """TF32 for float32 cuDNN convolutions and cuBLAS matmuls on CUDA, on or off (cuDNN's own default: on),
    through the legacy allow_tf32 flags only: once the per-op flags (torch.backends.*.fp32_precision) are set,
    reading a legacy one can raise, and inductor reads both kinds; after the legacy setters both agree."""
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


def tf32_flags():
    """The two flags set_tf32 sets, as they are now."""
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


@contextlib.contextmanager
def exact_fp32():
    """float32 convolutions and matmuls in full precision (TF32 off) inside, the flags restored after: the
    numbers that claim float32 (final evaluations, the counterfactual losses, CPU-vs-GPU comparisons)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if not any(saved):  # already exact: nothing to set (the default)
        yield
        return
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def peak_memory(device):
    """This process's peak memory so far, in GiB: the host's resident set, and on CUDA the allocator's."""
    import resource
    out = {"host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.device(device).type == "cuda":
        out.update(cuda_max_allocated_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                   cuda_max_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 3))
    return out


def _cuda_device(device, local_rank, local_world_size):
    """This process's indexed CUDA device (torch.cuda.set_device refuses a bare "cuda"): cuda:N as given, cuda
    as cuda:LOCAL_RANK."""
    if not torch.cuda.is_available():
        why = cuda_missing()
        raise UserError(f"--device {device} asked for, but no CUDA GPU is visible"
                        + (f" ({why}; torch built for CUDA {torch.version.cuda})" if why else "")
                        + " (use --device cpu)")
    count = torch.cuda.device_count()
    if device.index is None:
        if local_world_size > count:  # said by every process of this machine, not only the ones left over
            raise UserError(f"torchrun started {local_world_size} processes on this machine, but only {count} "
                            f"CUDA GPU(s) are visible: one GPU per process (--nproc_per_node <= {count})")
        if local_rank >= count:
            raise UserError(f"LOCAL_RANK {local_rank} would use cuda:{local_rank}, but only {count} CUDA GPU(s) "
                            f"are visible")
        return torch.device("cuda", local_rank)
    if local_world_size > 1:  # one flag for all processes: they would share one GPU, which nccl refuses
        raise UserError(f"--device {device} under torchrun with several processes per machine: give --device "
                        f"cuda (each process takes cuda:LOCAL_RANK); choose the GPUs with CUDA_VISIBLE_DEVICES")
    if device.index >= count:
        raise UserError(f"--device {device}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1})")
    return device


def setup(device=None, seed=0, amp=None, channels_last=None, tf32=False):
    """The run's Context: the device (default cuda when available), the numerics (amp "bf16" / "off",
    channels_last, None following the device; tf32 allowed in training, else off for the whole run), and
    the process group joined when torchrun started it (RANK/WORLD_SIZE/LOCAL_RANK in the environment)."""
    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise UserError(f"environment: RANK {rank} is outside WORLD_SIZE {world_size} (set by torchrun)")
    # one process ignores a stale LOCAL_RANK; without LOCAL_WORLD_SIZE (other launchers) all share this machine
    local_rank = _env_int("LOCAL_RANK", 0) if world_size > 1 else 0
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size) if world_size > 1 else 1
    if not 0 <= local_rank < local_world_size:
        raise UserError(f"environment: LOCAL_RANK {local_rank} is outside LOCAL_WORLD_SIZE {local_world_size} "
                        f"(set by torchrun)")
    if amp not in (None, True, False, *PRECISIONS):
        raise UserError(f"--amp {amp!r} must be one of {', '.join(PRECISIONS)}")
    amp = {"bf16": True, "off": False}.get(amp, amp)
    if device is not None and not str(device).strip():
        raise UserError("--device is empty: give cpu, cuda or cuda:N (or leave it out: cuda when available)")
    if tf32 not in (True, False):
        raise UserError(f"--tf32 {tf32!r} must be true or false")
    if not device and not torch.cuda.is_available():  # unasked on the CPU (a driver too old for the wheel, say)
        why = cuda_missing()
        if why and rank == 0 and why not in _WARNED:
            _WARNED.append(why)
            print(f"warning: running on the CPU: this torch {torch.__version__} is built for CUDA "
                  f"{torch.version.cuda}, but no GPU is usable ({why}); --device cpu says so and silences this",
                  file=sys.stderr, flush=True)
    device = _parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_tf32(tf32)
    if device.type == "cuda":
        device = _cuda_device(device, local_rank, local_world_size)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        if amp is not False and not torch.cuda.is_bf16_supported():  # autocast would refuse at the first step
            if amp:
                raise UserError(f"--amp bf16: {device} has no bfloat16 support (use --amp off)")
            amp = False
    torch.manual_seed(seed)  # model initialisation: the same on every rank and in every run of this seed
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                device if device.type == "cuda" else None)
    return Context(device=device, rank=rank, world_size=world_size, seed=seed, amp=amp,
                   channels_last=channels_last, tf32=tf32, local_rank=local_rank, local_world_size=local_world_size)


def teardown():
    """End of a run: every rank waits for the others (rank 0 writes after the last collective), then the group
    is destroyed before the interpreter exits: gloo's threads alive at its shutdown can abort it (SIGABRT)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (no-op on one process); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src=0):
    """Rank `src`'s Python object on every rank (no-op on one process)."""
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors, src=0):
    """Rank `src`'s values of `tensors` on every rank, in place (no-op on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=src)


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
