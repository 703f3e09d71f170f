"""Where a model runs, chosen once: device, mixed precision, memory format, DDP rank.

:class:`Placement` is what train, evaluate and bench share, so ``--device auto`` means the same
device, and AMP the same dtype, in all three.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from retinocli.errors import RetinoError


@dataclass(frozen=True)
class Placement:
    """A device and how to use it.

    Attributes:
        device: where tensors go (``cuda:<local rank>`` under torchrun).
        amp: autocast on; ``amp_dtype`` is bf16, or fp16 (with a grad scaler) without bf16.
        channels_last: NHWC memory format (on CUDA by default).
        rank, world, local_rank: this process under torchrun (0, 1, 0 otherwise).
        distributed: running under torchrun, even with one process.
    """

    device: torch.device
    amp: bool
    amp_dtype: torch.dtype
    channels_last: bool
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False

    @classmethod
    def choose(cls, spec: str = "auto", *, amp: bool | None = None, channels_last: bool | None = None,
               distributed: bool = False) -> Placement:
        """``spec`` as --device takes it; ``amp`` and ``channels_last`` None: on for CUDA.

        With ``distributed`` the torchrun environment (if any) picks the rank and local GPU.
        """
        ddp = distributed_env() if distributed else None
        rank, world, local_rank = ddp or (0, 1, 0)
        device = pick_device(spec, local_rank)
        cuda = device.type == "cuda"
        return cls(device=device, amp=cuda if amp is None else amp, amp_dtype=amp_dtype_for(device),
                   channels_last=cuda if channels_last is None else channels_last,
                   rank=rank, world=world, local_rank=local_rank, distributed=ddp is not None)

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def needs_scaler(self) -> bool:
        """fp16 autocast needs a grad scaler; bf16 does not."""
        return self.amp and self.amp_dtype == torch.float16

    @property
    def amp_name(self) -> str | None:
        """``bfloat16`` / ``float16`` when autocast is on, else None."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp else None

    def autocast(self):
        """The autocast context of this placement (a no-op when AMP is off)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext()

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved to the device, in channels_last when asked."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


def versions(device: torch.device) -> dict:
    """What a run records about where it ran: retino (and its git commit), torch, torchvision, Python,
    the device (and GPU)."""
    import platform

    import torchvision

    from retinocli import __version__
    from retinocli.machine import source_revision

    # str(): torch.__version__ is a TorchVersion, which the weights_only unpickler refuses
    out = {"retino": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
           "python": platform.python_version(), "device": str(device),
           # the machine the wall times in history.csv were measured on (RESULTS.md quotes it)
           "machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "retino_commit": source_revision()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = str(torch.version.cuda)
    return out


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU), then MPS, then CPU; anything named must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RetinoError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RetinoError(f"--device {spec}: CUDA is not available on this machine")
        device = with_index(device, local_rank)
        if device.index >= torch.cuda.device_count():
            raise RetinoError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RetinoError("--device mps: MPS is not available on this machine")
    return device


def with_index(device: torch.device, local_rank: int = 0) -> torch.device:
    """``cuda`` -> ``cuda:<local rank>``: torch.cuda.set_device and DDP need the index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """Mixed precision's dtype: bf16 (no grad scaler needed), fp16 on GPUs without bf16."""
    return torch.bfloat16 if (device.type != "cuda" or torch.cuda.is_bf16_supported()) else torch.float16


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under torchrun, even with one process; else None.

    One process under torchrun still runs DistributedDataParallel, so the multi-GPU code
    path can be tried on a machine with one GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
