"""What every benchmark script reports about the machine it ran on."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

GIB = 2.0 ** 30


def machine_info(*packages: str) -> dict:
    """CPU, memory, load and the versions of ``packages`` (module names) for a report."""
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / GIB, 1)
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        # Shared machines: the load at the start says how much the timings can be trusted.
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for name in ("numpy", *packages):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        version = getattr(module, "__version__", None)
        if version is None and hasattr(module, "Version_VersionString"):
            version = module.Version_VersionString()
        info[name] = version
    return info
