"""The device and process group of one process or a torchrun job: the one place that reads torchrun's RANK /
WORLD_SIZE / LOCAL_RANK, picks the device, starts the process group (NCCL on CUDA, gloo on the CPU) and tears it
down, and the plain rank-0 log that core code and the bundled script print through.
"""

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pgolf.errors import UsageError

# Imported before any process group exists, on purpose: this module binds `group.WORLD` as a default argument when
# first imported (torch._dynamo imports it, so any torch.compile does). Imported after init_process_group, it keeps
# the gloo group and its worker threads alive past destroy_process_group into interpreter shutdown, where a worker
# dropping a finished all_reduce's tensors needs the GIL and aborts the rank ("terminate called without an active
# exception": 5 in 52 two-rank CPU evals of the bundled script, 0 in 40 with this import). tests/test_dist.py.
if dist.is_available():  # (a torch built without distributed has no group to keep alive)
    import torch.distributed.nn.functional  # noqa: F401

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Ranks > 0 wait in a collective while rank 0 alone runs TTT or the compliance check: allow an hour.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=1)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    """auto = CUDA (this rank's GPU) when there is one, else the CPU; UsageError for an impossible choice."""
    if choice not in DEVICE_CHOICES:
        raise UsageError(f"--device {choice}: must be one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def configure_cuda() -> None:
    """The challenge's fast-math settings: TF32 for fp32 matmuls, flash attention (no cuDNN/mem-efficient)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def init_distributed(choice: str = "auto", fast_math: bool = False) -> Distributed:
    """One process, or torchrun's ranks: each on its own device, in one process group. `fast_math` turns on
    the challenge's CUDA settings (training uses them; evaluation keeps full fp32 matmuls)."""
    world_size, rank = env_world_size(), env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if fast_math:
            configure_cuda()
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device, timeout=PROCESS_GROUP_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Distributed(rank, world_size, local_rank, device)


def finish_distributed(completed: bool = True) -> None:
    """Tear the process group down; after a completed run, together (a barrier first), so no rank leaves while
    another still works. The group must really go here: see the torch.distributed.nn.functional import above for
    what kept gloo's threads alive into interpreter shutdown, where they aborted ranks that had finished."""
    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


class PlainLog:
    """info/warn lines on stderr, rank 0 only: how core code reports when no richer log is passed in (the
    bundled script has no rich); `pgolf.log` has the same two functions."""

    @staticmethod
    def info(message: str) -> None:
        if env_rank() == 0:
            print(message, file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        if env_rank() == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)
