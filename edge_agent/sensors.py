"""What the device can tell about its temperature, clock and power, read from sysfs.

Every reading is optional: a sensor that does not exist is reported as absent
(``None``), never as zero. ``root`` lets tests point the readers at a fake
sysfs tree.

Units follow the kernel's sysfs ABI: thermal ``temp`` is millidegrees Celsius;
power_supply ``voltage_now`` µV, ``current_now`` µA, ``power_now`` µW; hwmon
``power*_input`` µW, ``in*_input`` mV, ``curr*_input`` mA; cpufreq kHz.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _read_int(path: str | Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def thermal_zones(root: str = "/sys") -> list[dict[str, Any]]:
    zones = []
    for zone in sorted(glob.glob(os.path.join(root, "class/thermal/thermal_zone*"))):
        milli = _read_int(os.path.join(zone, "temp"))
        if milli is None:
            continue
        zones.append(
            {
                "zone": os.path.basename(zone),
                "type": _read(os.path.join(zone, "type")) or "unknown",
                "temp_c": milli / 1000.0,
            }
        )
    return zones


def cpu_temp_c(root: str = "/sys") -> float | None:
    """The CPU's temperature: a zone typed like a CPU/SoC sensor, else the hottest zone."""
    zones = thermal_zones(root)
    if not zones:
        return None
    preferred = [z for z in zones if any(k in z["type"].lower() for k in ("cpu", "soc", "x86_pkg", "package"))]
    return max(z["temp_c"] for z in (preferred or zones))


def cpu_freq_mhz(root: str = "/sys") -> float | None:
    khz = _read_int(os.path.join(root, "devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"))
    return khz / 1000.0 if khz else None


def cpu_max_freq_mhz(root: str = "/sys") -> float | None:
    khz = _read_int(os.path.join(root, "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"))
    return khz / 1000.0 if khz else None


def power_supplies(root: str = "/sys") -> list[dict[str, Any]]:
    """Batteries and supplies with whatever electrical readings they expose (SI units)."""
    out = []
    for dev in sorted(glob.glob(os.path.join(root, "class/power_supply/*"))):
        entry: dict[str, Any] = {"name": os.path.basename(dev), "type": _read(os.path.join(dev, "type")) or "unknown"}
        status = _read(os.path.join(dev, "status"))
        if status:
            entry["status"] = status
        cap = _read_int(os.path.join(dev, "capacity"))
        if cap is not None:
            entry["capacity_pct"] = cap
        volts = _read_int(os.path.join(dev, "voltage_now"))
        amps = _read_int(os.path.join(dev, "current_now"))
        watts = _read_int(os.path.join(dev, "power_now"))
        if volts is not None:
            entry["voltage_v"] = volts / 1e6
        if amps is not None:
            entry["current_a"] = amps / 1e6
        if watts is not None:
            entry["power_w"] = watts / 1e6
        elif volts is not None and amps is not None:
            entry["power_w"] = abs(volts * amps) / 1e12
        out.append(entry)
    return out


def hwmon_power(root: str = "/sys") -> list[dict[str, Any]]:
    """Power monitors under hwmon (INA219/INA226 and similar) that report watts or V and A."""
    out = []
    for hw in sorted(glob.glob(os.path.join(root, "class/hwmon/hwmon*"))):
        name = _read(os.path.join(hw, "name")) or os.path.basename(hw)
        micro_w = _read_int(os.path.join(hw, "power1_input"))
        milli_v = _read_int(os.path.join(hw, "in1_input"))
        milli_a = _read_int(os.path.join(hw, "curr1_input"))
        if micro_w is not None:
            out.append({"name": name, "path": hw, "power_w": micro_w / 1e6})
        elif milli_v is not None and milli_a is not None:
            out.append({"name": name, "path": hw, "power_w": milli_v * milli_a / 1e6})
    return out


def power_w(root: str = "/sys") -> tuple[float | None, str | None]:
    """(watts, source) from a real power sensor, or (None, None) when the device has none."""
    for sensor in hwmon_power(root):
        return sensor["power_w"], f"hwmon:{sensor['name']}"
    for supply in power_supplies(root):
        if "power_w" in supply and supply.get("status", "").lower() == "discharging":
            return supply["power_w"], f"power_supply:{supply['name']}"
    return None, None


def vcgencmd_throttled() -> int | None:
    """Raspberry Pi firmware throttling flags (``vcgencmd get_throttled``), or None off a Pi."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2).stdout
        return int(out.strip().split("=", 1)[1], 16)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def board_model() -> str | None:
    """The board name from the device tree (e.g. 'Raspberry Pi 4 Model B Rev 1.4')."""
    text = _read("/proc/device-tree/model")
    return text.rstrip("\x00") if text else None


def inventory(root: str = "/sys") -> dict[str, Any]:
    """Which sensors exist (for capabilities). Values are not included."""
    supplies = power_supplies(root)
    return {
        "thermal_zones": [z["type"] for z in thermal_zones(root)],
        "cpufreq": cpu_freq_mhz(root) is not None,
        "power_sensors": [s["name"] for s in hwmon_power(root)],
        "batteries": [s["name"] for s in supplies if s["type"].lower() == "battery"],
        "power_supplies": [s["name"] for s in supplies],
        "vcgencmd": shutil.which("vcgencmd") is not None,
        "board": board_model(),
    }
