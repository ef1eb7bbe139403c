"""Clock, temperature and driver readings through NVML (nvidia-ml-py), for run metadata.

Every reading is optional: without pynvml or NVML each function returns {} or "", never raises.
Clocks explain run-to-run differences (a GPU that has not boosted yet, or is throttling).
"""

from __future__ import annotations


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError, or NVMLError when the library is absent
        return None


def _handle(pynvml, pci_bus_id: str, index: int):
    # CUDA and NVML may number devices differently; the PCI bus id is the same in both.
    try:
        return pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
    except Exception:  # noqa: BLE001
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def clocks(pci_bus_id: str, index: int = 0) -> dict:
    """{"sm_mhz", "mem_mhz", "sm_max_mhz", "mem_max_mhz", "temperature_c"}: whatever NVML
    answers (a reading it refuses is left out)."""
    pynvml = _nvml()
    if pynvml is None:
        return {}
    out = {}
    try:
        handle = _handle(pynvml, pci_bus_id, index)
        readings = {
            "sm_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "sm_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(
                handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, read in readings.items():
            try:
                out[key] = int(read())
            except Exception:  # noqa: BLE001 - not supported on this device / in this VM
                pass
    except Exception:  # noqa: BLE001 - no handle for this device
        pass
    finally:
        _shutdown(pynvml)
    return out


def driver_version() -> str:
    """The display driver's version string (e.g. "580.159.04"), or "" without NVML."""
    pynvml = _nvml()
    if pynvml is None:
        return ""
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001
        return ""
    finally:
        _shutdown(pynvml)


def _shutdown(pynvml) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass
