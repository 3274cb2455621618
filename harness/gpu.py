"""The GPU's state, for env.json and for each CUDA record: name, memory, driver, clocks, power limit.

nvidia-ml-py (`pynvml`) answers when it is installed (the [gpu] extra brings it); without it the
record keeps what torch knows (name, memory) and says where the rest would come from. A clock read
right after a case's timing shows throttling: a GPU that ran at 1.4 GHz instead of its 1.98 GHz
maximum is not comparable with a run at full clock.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _nvml() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, no driver, no GPU: the caller records what torch knows
        return None
    return pynvml


def _index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def sm_clock_mhz(device: str = "cuda") -> int | None:
    """The SM clock now (MHz), or None without nvidia-ml-py."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        import torch

        # NVML counts physical GPUs; torch's index is within CUDA_VISIBLE_DEVICES, so go by bus id.
        bus = torch.cuda.get_device_properties(_index(device)).pci_bus_id
        handle = nvml.nvmlDeviceGetHandleByPciBusId(bus) if bus else nvml.nvmlDeviceGetHandleByIndex(_index(device))
        return int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
    except Exception:
        return None


def gpu_state() -> list[dict[str, Any]]:
    """One entry per visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    nvml = _nvml()
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        entry: dict[str, Any] = {
            "index": i,
            "name": props.name,
            "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
        }
        if nvml is None:
            entry["note"] = "driver, clocks and power limit need nvidia-ml-py (pip install nvidia-ml-py)"
        else:
            try:
                bus = getattr(props, "pci_bus_id", "")
                handle = nvml.nvmlDeviceGetHandleByPciBusId(bus) if bus else nvml.nvmlDeviceGetHandleByIndex(i)
                entry |= {
                    "driver": _text(nvml.nvmlSystemGetDriverVersion()),
                    "sm_clock_max_mhz": int(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)),
                    "sm_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                    "power_limit_w": nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
                }
            except Exception as exc:
                entry["note"] = f"nvidia-ml-py could not read this GPU: {type(exc).__name__}: {exc}"
        out.append(entry)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
