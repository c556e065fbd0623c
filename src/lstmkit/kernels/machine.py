"""Facts about the CPU this process runs on that the kernel rows' choices read."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["cpu_vendor"]


@functools.cache
def cpu_vendor() -> str | None:
    """The x86 CPU vendor /proc/cpuinfo names ('GenuineIntel', 'AuthenticAMD'); None where
    unknown (another system or architecture)."""
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "vendor_id":
                    return value.strip()
                if not line.strip():  # the first processor's block ends: no vendor_id line
                    return None
    except OSError:
        return None
    return None
