"""This process's memory and CPU, as the kernel counts them: one reader for the agent, its workers,
the bench children and the coordinator (Linux /proc where it exists, getrusage elsewhere)."""

from __future__ import annotations

import resource


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A size field of /proc/PID/status (``VmRSS``, ``VmHWM``, ...) in bytes; None where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def rss_bytes() -> int:
    """Resident memory now (0 where /proc is missing)."""
    return status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident memory since start or the last :func:`reset_peak_rss` (VmHWM; ru_maxrss elsewhere)."""
    peak = status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so a round's peak can be read on its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children_peak_rss_bytes() -> int:
    """Peak resident memory of the largest child this process has reaped."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU seconds of this process (or of its reaped children)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
