"""The accelerator's memory, read through torch: CUDA / ROCm (torch.cuda.mem_get_info) and Apple MPS (its
recommended limit). What the memory estimate is compared with (memory.estimate_report, the settings nodes'
memory_estimate output, `comfyui-dreambooth estimate`) and what the performance wizard plans for.
torch is imported inside the functions (CLI --help stays instant).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3


class PartBytes:
    """Bytes per part (`self.parts`, a dict): their total, and the parts in GB with the total (rounded)."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def gb(self) -> dict:
        out = {k: round(v / GB, 3) for k, v in self.parts.items()}
        out["total"] = round(self.total / GB, 3)
        return out


@dataclass
class DeviceMemory:
    """An accelerator's memory in bytes (free: None when it cannot be read)."""
    name: str
    total: int
    free: int | None = None


def device_memory(device) -> DeviceMemory | None:
    """The memory of `device` when it is an accelerator whose memory can be read (CUDA / ROCm, Apple MPS), else
    None (the CPU, or a device torch cannot report on)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return DeviceMemory(f"cuda:{index} ({torch.cuda.get_device_name(index)})", int(total), int(free))
    mps = getattr(torch, "mps", None)
    if device.type == "mps" and mps is not None and hasattr(mps, "recommended_max_memory"):
        total = int(mps.recommended_max_memory())
        used = int(mps.driver_allocated_memory()) if hasattr(mps, "driver_allocated_memory") else None
        return DeviceMemory("mps (Apple GPU, recommended limit)", total, None if used is None else total - used)
    return None


def read_device(device) -> tuple[DeviceMemory | None, str]:
    """(its memory, "") for an accelerator; (None, what was found instead) for the CPU, a device whose memory
    cannot be read, or None (not known). `device` may already be a DeviceMemory."""
    if device is None:
        return None, "no device detected"
    if isinstance(device, DeviceMemory):
        return device, ""
    memory = device_memory(device)
    if memory is not None:
        return memory, ""
    if getattr(device, "type", str(device)) == "cpu":
        return None, f"{device}, no accelerator found (training on the CPU uses system RAM)"
    return None, f"{device}, its memory cannot be read"


def free_device_memory_gb(device) -> float:
    """Free memory of an accelerator (torch.cuda.mem_get_info); ValueError on a CPU or an unknown device."""
    memory = device_memory(device)
    if memory is None or memory.free is None:
        raise ValueError(f"cannot read the free memory of device {device}; set vram_gb to the card's memory in GB")
    return memory.free / GB


# ---- where a module lives during training: the accelerator or the host ------------------------------------------
# The memory accounting (memory_measure.py) runs the pack's own training step on fake CPU tensors as if the CPU
# were the accelerator. While it does, `is_accelerator` says so for the CPU, and `to_host` / `to_device` book a
# module as moved off / onto the accelerator instead of moving it (fake tensors cannot change device). In a
# training run neither is set: `is_accelerator` is `device.type != "cpu"`, `to_host` is `.to("cpu")` and
# `to_device` is `.to(device)`.
_SIMULATED_HOST: list = []          # the accounting's booking function while it runs (one at a time)


def is_accelerator(device) -> bool:
    """True for an accelerator (CUDA, MPS, ...), False for the CPU (except inside the memory accounting)."""
    return getattr(device, "type", str(device)) != "cpu" or bool(_SIMULATED_HOST)


def to_host(module):
    """Move a module (or tensor: returned) off the accelerator to the CPU."""
    if _SIMULATED_HOST:
        _SIMULATED_HOST[-1](module, True)
        return module
    return module.to("cpu")


def to_device(module, device):
    """Move a module (or tensor: returned) to `device` (the accelerator training uses)."""
    if _SIMULATED_HOST:
        _SIMULATED_HOST[-1](module, False)
        return module
    return module.to(device)


class SimulatedAccelerator:
    """`with SimulatedAccelerator(book):` the CPU counts as the accelerator; `to_host(x)` calls `book(x, True)`,
    `to_device(x, device)` calls `book(x, False)`."""

    def __init__(self, book):
        self.book = book

    def __enter__(self):
        _SIMULATED_HOST.append(self.book)
        return self

    def __exit__(self, *exc):
        _SIMULATED_HOST.remove(self.book)
