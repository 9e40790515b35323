"""Where training runs: the device (--device), its precision (--precision) and the torchrun job.

CUDA, MPS and NCCL paths are kept to these few functions, over the CPU path that CI tests.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank on this node: picks cuda:LOCAL_RANK
    backend: str | None = None

    @staticmethod
    def env_world_size() -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @staticmethod
    def env_local_rank() -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> "Distributed":
        """Join the torchrun job, if any, over the backend that fits `device` (cpu when None)."""
        world = cls.env_world_size()
        if world <= 1:
            return cls()
        device = device or torch.device("cpu")
        if device.type == "mps":
            raise ConfigError("--device mps runs one process; run without torchrun, or use --device cpu")
        backend = backend_for(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)
        return cls(torch.distributed.get_rank(), world, cls.env_local_rank(), backend)

    @property
    def main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """The process-group backend for training on `device`: NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device --device names (auto: cuda, else mps, else cpu); a ConfigError when it is not here."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        requested = "cuda" if cuda else "mps" if mps_available() else "cpu"
    if requested == "cuda":
        if not cuda:
            raise ConfigError("--device cuda: no CUDA device is available on this machine "
                              "(torch.cuda.is_available() is False); use --device cpu or --device auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(f"--device cuda: LOCAL_RANK {local_rank} but this node has {count} CUDA device(s); "
                              f"start at most {count} processes per node")
        return torch.device("cuda", local_rank)
    if requested == "mps":
        if not mps_available():
            raise ConfigError("--device mps: no MPS device is available on this machine; use --device cpu or --device auto")
        return torch.device("mps")
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a --precision that `device` cannot train in."""
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU (its loss scaling is for cuda/mps); "
                          "on cpu use --precision bf16 or --precision fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16 or fp32")


def autocast(device: torch.device, precision: str):
    """The context the forward pass runs in: nothing for fp32, autocast to bf16/fp16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its 5-bit exponent underflows small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
