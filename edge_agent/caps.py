"""Capabilities: what this device is and can run, without importing anything heavy.

Runtimes are detected with ``importlib.util.find_spec`` and package metadata:
importing TensorFlow just to say it is there would cost seconds and hundreds of
MB on a Pi. ``can_train`` therefore means "TensorFlow, tf-keras and TF-MOT are
installed"; the training worker proves it when it starts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import time
from dataclasses import asdict
from typing import Any

import psutil

from . import __version__, sensors
from .protocol.constants import PROTOCOL_VERSION
from .protocol.messages import Capabilities

# (name reported, importable module, distribution names to read the version from)
RUNTIMES = (
    ("litert", "ai_edge_litert", ("ai-edge-litert",)),
    ("tflite_runtime", "tflite_runtime", ("tflite-runtime",)),
    ("tf.lite", "tensorflow", ("tensorflow", "tensorflow-cpu")),
)
TRAIN_STACK = (
    ("tensorflow", "tensorflow", ("tensorflow", "tensorflow-cpu")),
    ("tf_keras", "tf_keras", ("tf-keras",)),
    ("tfmot", "tensorflow_model_optimization", ("tensorflow-model-optimization",)),
)


def _version(module: str, dists: tuple[str, ...]) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _found(table) -> dict[str, str]:
    out = {}
    for name, module, dists in table:
        version = _version(module, dists)
        if version is not None:
            out[name] = version
    return out


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def _cpu_model() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, _, value = line.partition(":")
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return (
        fields.get("model name") or fields.get("Model") or fields.get("Hardware") or platform.processor() or "unknown"
    )


def collect(device_id: str, state_dir: str, sysfs_root: str = "/sys") -> Capabilities:
    vm = psutil.virtual_memory()
    disk_path = state_dir if os.path.isdir(state_dir) else os.path.expanduser("~")
    stack = _found(TRAIN_STACK)
    freq = sensors.cpu_max_freq_mhz(sysfs_root)
    if freq is None:
        try:
            f = psutil.cpu_freq()
            freq = float(f.max) if f and f.max else None
        except (OSError, NotImplementedError, AttributeError):
            freq = None
    return Capabilities(
        device_id=device_id,
        agent_version=__version__,
        protocol_version=PROTOCOL_VERSION,
        os=platform.system(),
        os_release=_os_release(),
        arch=platform.machine(),
        cpu_model=_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        cpu_max_mhz=freq,
        python_version=platform.python_version(),
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        disk_free_bytes=int(shutil.disk_usage(disk_path).free),
        runtimes=_found(RUNTIMES),
        can_train=len(stack) == len(TRAIN_STACK),
        train_stack=stack,
        sensors=sensors.inventory(sysfs_root),
        ts=time.time(),
    )


def as_dict(caps: Capabilities) -> dict[str, Any]:
    return asdict(caps)
