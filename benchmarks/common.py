"""Helpers shared by the benchmark scripts: a local fleet on real processes."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator import broker as broker_mod  # noqa: E402

BIN = Path(sys.executable).parent


def machine() -> dict:
    import psutil

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@contextlib.contextmanager
def local_fleet(
    n: int, fleet: str, agent_args: list[str] | None = None, per_agent=None, broker_kind: str = "auto", nice: int = 0
):
    """A broker plus ``n`` agent processes; yields (broker, workdir). Everything is stopped afterwards.
    ``nice``: run the agents (and their training workers) at this niceness."""
    work = Path(tempfile.mkdtemp(prefix="edgeprune-bench-"))
    b = broker_mod.start(broker_kind, "127.0.0.1", 0, work / "broker", log_file=work / "broker.log")
    procs = []
    try:
        for i in range(n):
            args = (["nice", "-n", str(nice)] if nice else []) + [
                str(BIN / "edgeprune-agent"),
                "run",
                "--broker",
                b.url,
                "--fleet",
                fleet,
                "--device-id",
                f"dev{i:03d}",
                "--state-dir",
                str(work / f"agent{i}"),
                *(agent_args or []),
                *(per_agent(i) if per_agent else []),
            ]
            procs.append(subprocess.Popen(args, stdout=open(work / f"agent{i}.log", "ab"), stderr=subprocess.STDOUT))
        yield b, work
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        b.stop()


def hwm_bytes(pid: int) -> int | None:
    """A process's own peak RSS so far (Linux VmHWM): exact, where sampling RSS can miss a spike."""
    from edge_agent.common.procstats import status_bytes

    return status_bytes("VmHWM", pid)


class PeakRss:
    """Peak RSS of a process and each of its descendants (its TF workers), looked at every 0.5 s and once
    more at stop(): each process's VmHWM where Linux has it (nothing between samples is missed, only a
    child that lives and dies between two looks), else its sampled RSS. Multiprocessing's resource
    tracker is not counted as a worker."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak_by_pid, self.helpers, self._stop = psutil.Process(pid), {}, set(), threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        with self._lock:
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    if p.pid not in self.peak_by_pid and "resource_tracker" in " ".join(p.cmdline()):
                        self.helpers.add(p.pid)
                    rss = max(hwm_bytes(p.pid) or 0, p.memory_info().rss)
                except psutil.Error:
                    continue
                self.peak_by_pid[p.pid] = max(self.peak_by_pid.get(p.pid, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def stop(self) -> dict[str, int]:
        self._sample()
        self._stop.set()
        own = self.peak_by_pid.get(self.proc.pid, 0)
        workers = [v for k, v in self.peak_by_pid.items() if k != self.proc.pid and k not in self.helpers]
        return {"simulator_agents": own, "worker_max": max(workers, default=0), "workers": len(workers)}


def bench_artifacts(session, store, artifacts: list[dict], device: str, runs: int, warmup: int, budget_s: float):
    """Benchmark ``artifacts`` on one device (1 thread, interleaved, LiteRT); {artifact name: result}."""
    from coordinator import bench as bench_mod
    from coordinator.progress import Reporter

    res = bench_mod.bench(
        session,
        store,
        artifacts,
        [device],
        run_id=None,
        threads=1,
        runs=runs,
        duration_s=None,
        warmup=warmup,
        budget_s=budget_s,
        runtime="auto",
        parallel=False,
        reporter=Reporter(quiet=True),
    )
    return {r["artifact"]: r for r in res["devices"][device]["artifacts"]}


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t0, out
