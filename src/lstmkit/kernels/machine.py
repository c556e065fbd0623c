"""Facts about the CPU this process runs on that the kernel rows' choices read."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["cpuinfo", "cpu_model", "cpu_vendor"]


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ('vendor_id', 'cpu family', 'model',
    'model name', ...); empty where there is no such file (another system)."""
    fields: dict[str, str] = {}
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():  # the first processor's block ends
                    break
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_vendor() -> str | None:
    """The x86 CPU vendor /proc/cpuinfo names ('GenuineIntel', 'AuthenticAMD'); None where
    unknown (another system or architecture)."""
    return cpuinfo().get("vendor_id")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what :mod:`platform` says."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine()
