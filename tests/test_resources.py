"""A model too large for the device is refused with the numbers before it is fetched or TensorFlow
starts: a real agent and coordinator over Mosquitto; only the device's free memory and disk are
made small (psutil's and shutil's answers), since this machine has plenty of both."""

from __future__ import annotations

import collections
import hashlib

from edge_agent import commands

WIDE_MODEL_BYTES = 25_988_648  # fmnist_cnn_wide as fp32: 6,497,162 parameters


def _round(s, model_bytes: int):
    ref = {"sha256": hashlib.sha256(b"never fetched").hexdigest(), "bytes": model_bytes, "chunks": 100}
    return s.call("pi1", "train_round", {"run_id": "r1", "round": 1, "model": ref}, timeout_s=20)


def test_a_model_too_large_for_free_memory_is_refused_before_anything_starts(live, monkeypatch):
    agent, s = live
    vm = collections.namedtuple("vm", "available total")
    monkeypatch.setattr("psutil.virtual_memory", lambda: vm(1000 * 10**6, 2000 * 10**6))
    reply = _round(s, WIDE_MODEL_BYTES)
    assert reply.error_code == "resources", reply
    assert "26.0 MB" in reply.error_message and "(estimate)" in reply.error_message
    assert "1,000 MB available" in reply.error_message
    assert agent.trainer is None  # no TensorFlow worker was started
    # the same device would take digits_cnn (1.1 MB): the check refuses sizes, not everything
    commands.check_training_fits(agent, 1_135_144)


def test_a_model_too_large_for_free_disk_is_refused(live, monkeypatch):
    agent, s = live
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**9, 10**9 - 30 * 10**6, 30 * 10**6))
    reply = _round(s, WIDE_MODEL_BYTES)
    assert reply.error_code == "resources", reply
    assert "disk free" in reply.error_message and f"{WIDE_MODEL_BYTES:,} bytes" in reply.error_message
    assert agent.trainer is None
