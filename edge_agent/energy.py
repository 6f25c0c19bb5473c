"""Energy per inference: measured when the device has a power sensor, otherwise estimated.

Every figure carries a label: ``measured`` (a power sensor was sampled during the
timed runs: energy = mean power x mean latency), ``estimated`` (a per-board power
model, named in the result), or ``not available`` (no sensor and no model for this
board). Never a silent zero.

The estimate is board power while the benchmark runs:
``P = P_idle + (P_load - P_idle) * min(threads, cores) / cores``, i.e. linear in the
number of busy cores between the published idle and all-cores-busy figures below,
and energy per inference = P x mean latency. It includes the board's idle draw
(what a battery actually pays), not just the marginal cost of the inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PIDRAMBLE = "https://www.pidramble.com/wiki/benchmarks/power-consumption"


@dataclass(frozen=True)
class BoardPower:
    match: str  # substring of /proc/device-tree/model
    idle_w: float
    load_w: float  # all cores busy (stress --cpu 4)
    cores: int
    source: str


# Measured at the USB power input by the Raspberry Pi Dramble project (Jeff Geerling),
# headless, no peripherals: idle and `stress --cpu 4`.
BOARDS = (
    BoardPower("Raspberry Pi 4 Model B", idle_w=2.7, load_w=6.4, cores=4, source=PIDRAMBLE),
    BoardPower("Raspberry Pi 3 Model B Plus", idle_w=1.9, load_w=5.1, cores=4, source=PIDRAMBLE),
)


def board_power(board: str | None) -> BoardPower | None:
    if not board:
        return None
    return next((b for b in BOARDS if b.match in board), None)


def estimate(board: str | None, threads: int, latency_ms: float) -> dict[str, Any]:
    model = board_power(board)
    if model is None:
        return {
            "label": "not available",
            "per_inference_mj": None,
            "reason": f"no power sensor and no power model for board {board or 'unknown'}",
        }
    busy = min(max(threads, 1), model.cores) / model.cores
    watts = model.idle_w + (model.load_w - model.idle_w) * busy
    return {
        "label": "estimated",
        "per_inference_mj": round(watts * latency_ms, 6),
        "power_w": round(watts, 3),
        "model": f"{model.match}: idle {model.idle_w} W, {model.cores}-core load {model.load_w} W, "
        f"linear in busy cores ({model.source})",
    }


def measured(power_samples_w: list[float], latency_ms: float, source: str) -> dict[str, Any]:
    watts = sum(power_samples_w) / len(power_samples_w)
    return {
        "label": "measured",
        "per_inference_mj": round(watts * latency_ms, 6),
        "power_w": round(watts, 4),
        "samples": len(power_samples_w),
        "sensor": source,
    }
