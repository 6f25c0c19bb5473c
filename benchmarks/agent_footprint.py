"""Agent footprint: idle memory, start-to-online time, and memory after a training round.

A real `edgeprune-agent run` process against a real Mosquitto, measured from outside
(/proc/<pid>/status, the retained status topic):

- start -> online: from spawning the process to its retained ``online`` status arriving
  at a subscriber (Python start-up, imports, connect, announce), over --starts starts;
- idle RSS: connected and heartbeating for a while, checked to have no TensorFlow
  mapped (/proc/<pid>/maps); plain, and with the secure fleet's Ed25519 keys loaded;
- after training: one `edgeprune train --rounds 1` over the agent (TF-MOT in its
  worker child), then `train_end`; the agent's RSS against its idle RSS, and that
  the worker process is gone.

    python benchmarks/agent_footprint.py [--json] [--starts 5]

Targets (this machine): idle RSS <= 40 MB; start -> online <= 1 s; memory back to idle
(within 5 MB) after a training round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import BIN, broker_mod, machine

MAX_IDLE_RSS_MB = 40.0
MAX_START_S = 1.0
MAX_RETURN_MB = 5.0
IDLE_SETTLE_S = 6.0  # several heartbeats (--heartbeat-s 1) before the idle figure is read


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def has_tensorflow(pid: int) -> bool:
    return any("tensorflow" in line for line in open(f"/proc/{pid}/maps"))


def children(pid: int) -> list[int]:
    """Child processes started by any of the process's threads (the worker is spawned from the job thread)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


class StatusWatch:
    """Subscribes to every status in the fleet; records when each device first said ``online``."""

    def __init__(self, url: str, fleet: str):
        import paho.mqtt.client as mqtt

        from edge_agent.protocol import serde, topics
        from edge_agent.protocol.messages import Status

        host, port = url.split("//")[1].split(":")
        self.online: dict[str, float] = {}
        self.lock = threading.Lock()

        def on_message(c, u, m):
            st = serde.decode(Status, m.payload)
            if st.state == "online" and not m.retain:
                with self.lock:
                    self.online.setdefault(st.device_id, time.perf_counter())

        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.c.on_message = on_message
        self.c.connect(host, int(port))
        self.c.subscribe(topics.device_filter(fleet, "status"), 1)
        self.c.loop_start()

    def wait(self, device: str, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if device in self.online:
                    return self.online[device]
            time.sleep(0.002)
        return None


def agent_cmd(url: str, fleet: str, device: str, state: Path, extra: list[str]) -> list[str]:
    return [
        str(BIN / "edgeprune-agent"),
        "run",
        "--broker",
        url,
        "--fleet",
        fleet,
        "--device-id",
        device,
        "--state-dir",
        str(state),
        "--heartbeat-s",
        "1",
        *extra,
    ]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=5, help="agent starts timed (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per measured configuration")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeprune-footprint-"))
    b = broker_mod.start("auto", "127.0.0.1", 0, work / "broker", log_file=work / "broker.log")
    fleet = "fp"
    watch = StatusWatch(b.url, fleet)
    rows = []
    try:
        # 1. start -> online, and idle RSS, plain
        starts = []
        for i in range(a.starts):
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                agent_cmd(b.url, fleet, f"start{i}", work / f"start{i}", []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            seen = watch.wait(f"start{i}", 30)
            starts.append((seen - t0) if seen else float("inf"))
            if i < a.starts - 1:
                stop(proc)
        time.sleep(IDLE_SETTLE_S)
        idle = rss_mb(proc.pid)
        tf_plain = has_tensorflow(proc.pid)
        stop(proc)
        rows.append(
            {
                "configuration": "start_to_online",
                "starts": len(starts),
                "median_s": round(statistics.median(starts), 3),
                "max_s": round(max(starts), 3),
                "all_s": [round(s, 3) for s in starts],
                "target": {"max_median_s": MAX_START_S},
                "target_met": statistics.median(starts) <= MAX_START_S,
            }
        )
        rows.append(
            {
                "configuration": "idle_plain",
                "rss_mb": round(idle, 1),
                "tensorflow_mapped": tf_plain,
                "target": {"max_rss_mb": MAX_IDLE_RSS_MB},
                "target_met": idle <= MAX_IDLE_RSS_MB and not tf_plain,
            }
        )

        # 2. idle with the secure fleet's signing keys (cryptography loaded)
        from edge_agent.protocol import signing

        dev_key, coord_key = signing.new_key(), signing.new_key()
        (work / "device.key").write_bytes(signing.private_pem(dev_key))
        (work / "coordinator.pub").write_bytes(signing.public_pem(coord_key))
        proc = subprocess.Popen(
            agent_cmd(
                b.url,
                fleet,
                "signed",
                work / "signed",
                ["--sign-key", str(work / "device.key"), "--coordinator-key", str(work / "coordinator.pub")],
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if watch.wait("signed", 30) is None:
            raise RuntimeError("the agent with signing keys did not come online")
        time.sleep(IDLE_SETTLE_S)
        idle_signed = rss_mb(proc.pid)
        stop(proc)
        rows.append(
            {
                "configuration": "idle_with_signing_keys",
                "rss_mb": round(idle_signed, 1),
                "target": {"max_rss_mb": MAX_IDLE_RSS_MB},
                "target_met": idle_signed <= MAX_IDLE_RSS_MB,
            }
        )

        # 3. a training round, then back to idle
        proc = subprocess.Popen(
            agent_cmd(b.url, fleet, "trainer", work / "trainer", ["--data", "digits", "--train-threads", "1"]),
            stdout=open(work / "trainer.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        if watch.wait("trainer", 30) is None:
            raise RuntimeError("the training agent did not come online")
        time.sleep(IDLE_SETTLE_S)
        before = rss_mb(proc.pid)
        out = subprocess.run(
            [
                str(BIN / "edgeprune"),
                "train",
                "--broker",
                b.url,
                "--fleet",
                fleet,
                "--home",
                str(work / "coord"),
                "--rounds",
                "1",
                "--sparsity",
                "0.8",
                "--schedule",
                "constant",
                "--devices",
                "trainer",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode != 0:
            raise RuntimeError(f"edgeprune train failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
        summary = json.loads(out.stdout)
        from coordinator.store import Store

        clients = Store(work / "coord").client_rounds(summary["run_id"])
        worker_peak = ((clients[0]["metrics"] or {}) if clients else {}).get("peak_rss_bytes")
        deadline = time.monotonic() + 30
        while children(proc.pid) and time.monotonic() < deadline:  # train_end stops the worker
            time.sleep(0.2)
        time.sleep(IDLE_SETTLE_S)
        after, peak_main = rss_mb(proc.pid), rss_mb(proc.pid, "VmHWM")
        left = children(proc.pid)
        tf_after = has_tensorflow(proc.pid)
        stop(proc)
        rows.append(
            {
                "configuration": "after_training_round",
                "idle_before_mb": round(before, 1),
                "after_mb": round(after, 1),
                "delta_mb": round(after - before, 1),
                "agent_process_peak_mb": round(peak_main, 1),
                "worker_processes_left": len(left),
                "tensorflow_mapped_in_agent": tf_after,
                "round_ok": summary["state"] == "done",
                "worker_peak_rss_mb": round(worker_peak / 2**20, 1) if worker_peak else None,
                "target": {"max_delta_mb": MAX_RETURN_MB, "worker_processes_left": 0},
                "target_met": (after - before) <= MAX_RETURN_MB and not left and not tf_after,
            }
        )
    finally:
        watch.c.loop_stop()
        b.stop()
    rows.append({"configuration": "machine", **machine()})
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        s, i, k, t = rows[0], rows[1], rows[2], rows[3]
        mark = lambda r: "met" if r["target_met"] else "MISSED"  # noqa: E731
        print(
            f"start -> online   median {s['median_s']:.3f} s, max {s['max_s']:.3f} s over {s['starts']} starts "
            f"(target <= {MAX_START_S} s)  {mark(s)}"
        )
        print(
            f"idle RSS          {i['rss_mb']:.1f} MB plain (TensorFlow mapped: {i['tensorflow_mapped']}), "
            f"{k['rss_mb']:.1f} MB with signing keys (target <= {MAX_IDLE_RSS_MB:.0f} MB)  {mark(i)} / {mark(k)}"
        )
        print(
            f"training round    agent {t['idle_before_mb']:.1f} MB idle -> {t['after_mb']:.1f} MB after "
            f"(delta {t['delta_mb']:+.1f} MB, agent peak {t['agent_process_peak_mb']:.1f} MB, worker peak "
            f"{t['worker_peak_rss_mb']} MB, workers left {t['worker_processes_left']})  {mark(t)}"
        )
    return 0 if all(r.get("target_met", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
