"""Device choice and torchrun/DistributedDataParallel set-up (PyTorch's own engine: nccl on CUDA, gloo on
CPU). Without torchrun every helper here is a no-op and the world has one rank."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def amp(self):  # bf16 autocast and channels_last on CUDA; plain float32 on CPU
        return self.device.type == "cuda"


def setup(device=None, seed=0):
    """Pick the device (`cuda` when available unless --device says otherwise) and join the process group
    when started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA GPU is visible")
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)  # model initialisation: the same on every rank and in every run of this seed
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                device if device.type == "cuda" else None)
    return Context(device=device, rank=rank, world_size=world_size, seed=seed)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (no-op on one process); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src=0):
    """Rank `src`'s Python object on every rank (no-op on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
