"""Reading a Mosquitto log for the disconnects that mean a corrupted or stalled stream."""

ABNORMAL = ("protocol error", "malformed packet", "socket error", "exceeded timeout", "bad socket")


def abnormal_disconnects(log_text: str) -> list[str]:
    """Log lines of clients the broker dropped (not those that disconnected cleanly or were taken over)."""
    return [line for line in log_text.splitlines() if any(word in line.lower() for word in ABNORMAL)]
