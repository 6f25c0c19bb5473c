"""On-device benchmark of TFLite artifacts.

Each artifact is loaded in its own child process, so a model that crashes the
runtime costs one result, not the agent; peak and added RSS are that model's
alone; and a run over its time budget is simply killed. The children stay up
together and are timed in interleaved blocks (A, B, C, A, B, C, ...), so a
dense-vs-sparse comparison on a noisy device sees the same noise.

Every harness block is paired with a block of an independent plain
``time.perf_counter`` loop over the same interpreter (alternating which goes
first); the two medians are reported side by side as a check that the harness
does not distort timings.

Runtime: the best one installed: LiteRT (``ai_edge_litert``), else
``tflite_runtime``, else ``tf.lite``; which one ran is recorded. If the default
delegate (XNNPACK) refuses a model, the child retries without it and records the
fallback and its reason.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from typing import Any

import numpy as np

from . import energy, sensors
from .common import procstats
from .common.childproc import Child, ChildGone, ChildTimeout, serve
from .ml.tflite_info import is_tflite
from .protocol.errors import ErrorCode, ProtocolError

RUNTIMES = ("litert", "tflite_runtime", "tf.lite")
LOAD_TIMEOUT_S = 120.0


# -- child process ---------------------------------------------------------------


def _import_runtime(prefer: str):
    """(name, version, Interpreter, no-default-delegate kwargs or None)."""
    order = RUNTIMES if prefer in (None, "", "auto") else (prefer,)
    errors = []
    for name in order:
        try:
            if name == "litert":
                import importlib.metadata as md

                from ai_edge_litert import interpreter as mod

                return (
                    name,
                    md.version("ai-edge-litert"),
                    mod.Interpreter,
                    {"experimental_op_resolver_type": mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES},
                )
            if name == "tflite_runtime":
                import importlib.metadata as md

                from tflite_runtime import interpreter as mod

                return (
                    name,
                    md.version("tflite-runtime"),
                    mod.Interpreter,
                    {"experimental_op_resolver_type": mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES},
                )
            if name == "tf.lite":
                from .ml.tfenv import load

                tf = load().tf
                return (
                    name,
                    tf.__version__,
                    tf.lite.Interpreter,
                    {
                        "experimental_op_resolver_type": tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                    },
                )
        except Exception as exc:  # ImportError, or tflite_runtime's SystemError under numpy 2
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise RuntimeError("no TFLite runtime works here: " + "; ".join(errors))


def _make_input(detail: dict, rng: np.random.Generator) -> np.ndarray:
    shape, dtype = detail["shape"], detail["dtype"]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype)
    return rng.random(shape, dtype=np.float32).astype(dtype)


def _load(Interpreter, path: str, threads: int, **options):
    """Build, allocate, fill inputs, run once: (interpreter, load seconds, first inference ms)."""
    t0 = time.perf_counter()
    interp = Interpreter(model_path=path, num_threads=threads or None, **options)
    interp.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], _make_input(d, rng))
    t1 = time.perf_counter()
    interp.invoke()
    return interp, t1 - t0, (time.perf_counter() - t1) * 1000


def child_main(conn, path: str, threads: int, runtime: str) -> None:
    """Serve timing requests for one model (``load`` first) until the parent ends it."""
    state: dict[str, Any] = {}

    def load() -> dict[str, Any]:
        try:
            name, version, Interpreter, no_delegate = _import_runtime(runtime)
            baseline = procstats.rss_bytes()
            fallback = None
            try:
                interp, load_s, first_ms = _load(Interpreter, path, threads)
            except (RuntimeError, ValueError) as exc:  # e.g. XNNPACK failing to prepare a sparse int8 graph
                reason = str(exc).strip().splitlines()[0][:500]
                fallback = {"delegate": "none (builtin kernels only)", "reason": reason}
                interp, load_s, first_ms = _load(Interpreter, path, threads, **no_delegate)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:1000]}"}
        state["interp"] = interp
        return {
            "ok": True,
            "runtime": {"name": name, "version": version},
            "fallback": fallback,
            "load_s": round(load_s, 6),
            "first_inference_ms": round(first_ms, 4),
            "rss_baseline_bytes": baseline,
            "rss_after_load_bytes": procstats.rss_bytes(),
        }

    def handle(msg: dict[str, Any]) -> dict[str, Any]:
        op, n = msg["op"], int(msg.get("n", 0))
        if op == "load":
            return load()
        interp = state["interp"]
        invoke = interp.invoke
        if op == "warmup":
            for _ in range(n):
                invoke()
            return {"ok": True}
        if op == "time":  # the harness: one timing per inference
            clock = time.perf_counter_ns
            out = []
            for _ in range(n):
                t = clock()
                invoke()
                out.append(clock() - t)
            return {"ok": True, "times": out}
        if op == "independent":  # a separate plain loop over the same interpreter, for cross-checking
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                interp.invoke()
                times.append(time.perf_counter() - t0)
            return {"ok": True, "times": times}
        if op == "finish":
            return {"ok": True, "rss_peak_bytes": procstats.peak_rss_bytes(), "rss_end_bytes": procstats.rss_bytes()}
        raise ValueError(f"unknown bench op {op!r}")

    serve(conn, handle)


# -- parent (agent job) ----------------------------------------------------------


def latency_stats(ns: list[int]) -> dict[str, float]:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    return {
        "mean": float(ms.mean()),
        "std": float(ms.std()),
        "min": float(ms.min()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "n": int(ms.size),
    }


class _Child:
    """One artifact's runtime process, with the time budget it may spend."""

    def __init__(self, name: str, path: str, threads: int, runtime: str, budget_s: float):
        self.name, self.path, self.budget_s = name, path, budget_s
        self.child = Child(child_main, (path, threads, runtime), name=f"edgeprune-bench-{name}")
        self.started = time.monotonic()
        self.spent_s = 0.0
        self.latencies: list[int] = []
        self.independent_s: list[float] = []
        self.error: str | None = None
        self.status = "ok"
        self.info: dict[str, Any] = {}

    def ask(self, op: str, n: int = 0, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Send and wait, within the artifact's remaining budget; kill it if it overruns."""
        remaining = self.budget_s - self.spent_s
        wait = min(remaining, timeout_s) if timeout_s else remaining
        t0 = time.monotonic()
        try:
            return self.child.request({"op": op, "n": n}, max(0.0, wait))
        except ChildTimeout:
            self.kill("timeout", f"exceeded its time budget of {self.budget_s:.0f} s")
        except ChildGone as exc:
            self.kill("error", f"runtime process died (exit code {exc.exitcode})")
        finally:
            self.spent_s += time.monotonic() - t0
        return None

    def kill(self, status: str, why: str) -> None:
        self.status, self.error = status, why
        self.child.kill()

    def close(self) -> None:
        self.child.close(kill=not self.alive)

    @property
    def alive(self) -> bool:
        return self.status == "ok"


class PowerSampler(threading.Thread):
    """Samples the power sensor (if any) while the timed blocks run."""

    def __init__(self, root: str, interval_s: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.samples: list[float] = []
        self.source: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            watts, source = sensors.power_w(self.root)
            if watts is not None:
                self.samples.append(watts)
                self.source = source
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def thermal_snapshot(root: str) -> dict[str, Any]:
    return {
        "temp_c": sensors.cpu_temp_c(root),
        "freq_mhz": sensors.cpu_freq_mhz(root),
        "throttled_flags": sensors.vcgencmd_throttled(),
    }


def run(
    artifacts: list[dict[str, Any]],
    *,
    threads: int,
    runs: int | None,
    duration_s: float | None,
    warmup: int,
    budget_s: float,
    runtime: str,
    board: str | None,
    sysfs_root: str,
    progress=lambda **kw: None,
    blocks: int = 10,
) -> dict[str, Any]:
    """Benchmark ``artifacts`` ([{name, path, sha256, bytes}]) interleaved; return per-artifact results."""
    before = thermal_snapshot(sysfs_root)
    children: list[_Child] = []
    results: dict[str, dict[str, Any]] = {}
    for a in artifacts:
        progress(phase="loading", artifact=a["name"])
        with open(a["path"], "rb") as f:
            head = f.read(8)
        if not is_tflite(head):
            results[a["name"]] = {"status": "error", "error": "not a TFLite model (no 'TFL3' identifier)"}
            continue
        c = _Child(a["name"], a["path"], threads, runtime, budget_s)
        info = c.ask("load", timeout_s=LOAD_TIMEOUT_S)
        if info is not None and not info.get("ok"):
            c.kill("error", f"cannot load: {info.get('error')}")
        elif info is not None:
            c.info = info
        children.append(c)
    live = [c for c in children if c.alive]
    for c in live:
        c.ask("warmup", warmup)
    per_block = max(1, math.ceil((runs or 100) / blocks))
    sampler = PowerSampler(sysfs_root)
    sampler.start()
    t_start = time.monotonic()
    block = 0
    while True:
        live = [c for c in children if c.alive]
        if not live:
            break
        if runs is not None and all(len(c.latencies) >= runs for c in live):
            break
        if duration_s is not None and time.monotonic() - t_start >= duration_s * len(live):
            break
        block += 1
        for c in live:  # interleaved: every model gets a block in turn
            n = per_block if runs is None else min(per_block, runs - len(c.latencies))
            if n <= 0:
                continue
            c.ask("warmup", max(5, n // 4))  # caches are cold after the other models ran: re-warm, untimed
            # the cross-check loop runs in the same period on the same interpreter, first on every other
            # block, so neither side systematically gets the colder start
            order = ("time", "independent") if block % 2 else ("independent", "time")
            for op in order:
                out = c.ask(op, n) if c.alive else None
                if out is not None:
                    (c.latencies if op == "time" else c.independent_s).extend(out["times"])
        progress(
            phase="timing", done=sum(len(c.latencies) for c in children), total=(runs or 0) * len(children) or None
        )
    sampler.stop()
    after = thermal_snapshot(sysfs_root)
    for c in children:
        res: dict[str, Any] = {
            "status": c.status,
            "error": c.error,
            "threads": threads,
            **{k: c.info.get(k) for k in ("runtime", "fallback", "load_s", "first_inference_ms")},
        }
        if c.alive and c.latencies:
            stats = latency_stats(c.latencies)
            fin = c.ask("finish")
            res.update({"latency_ms": stats, "warmup": warmup, "runs": len(c.latencies)})
            if c.independent_s:
                indep_ms = statistics.median(c.independent_s) * 1000
                res["independent_loop_ms"] = {
                    "median": indep_ms,
                    "mean": statistics.fmean(c.independent_s) * 1000,
                    "n": len(c.independent_s),
                }
                res["harness_vs_independent"] = round(stats["p50"] / indep_ms, 4)
            if fin:
                base = c.info["rss_baseline_bytes"]
                res["memory"] = {
                    "rss_baseline_bytes": base,
                    "rss_after_load_bytes": c.info["rss_after_load_bytes"],
                    "rss_peak_bytes": fin["rss_peak_bytes"],
                    "rss_increase_bytes": fin["rss_end_bytes"] - base,
                }
            if sampler.samples:
                res["energy"] = energy.measured(sampler.samples, stats["mean"], sampler.source or "sensor")
            else:
                res["energy"] = energy.estimate(board, threads, stats["mean"])
        elif c.alive:
            c.kill("error", "no timings collected")
            res.update(status=c.status, error=c.error)
        c.close()
        results[c.name] = res
    for a in artifacts:
        results[a["name"]].update(
            {"artifact": a["name"], "sha256": a["sha256"], "bytes": a["bytes"], "cached": a.get("cached", False)}
        )
    throttled = None
    if before["throttled_flags"] is not None and after["throttled_flags"] is not None:
        # bits 0-3: throttling now; 16-19: since boot. New sticky bits mean it happened during the run.
        throttled = (
            bool(after["throttled_flags"] & 0xF)
            or (after["throttled_flags"] & ~before["throttled_flags"] & 0xF0000) != 0
        )
    return {
        "artifacts": [results[a["name"]] for a in artifacts],
        "order": "interleaved blocks" if len(children) > 1 else "single",
        "thermal": {
            "before": before,
            "after": after,
            "throttled_during_run": throttled,
            "temp_sensor": "available" if before["temp_c"] is not None else "not available",
        },
        "board": board,
        "wall_s": round(time.monotonic() - t_start, 3),
    }


def check_resources(total_bytes: int, state_dir: str) -> None:
    """Refuse artifacts that cannot fit on disk or in RAM, with the numbers."""
    import shutil

    import psutil

    free_disk = shutil.disk_usage(state_dir).free
    free_ram = psutil.virtual_memory().available
    if total_bytes > free_disk:
        raise ProtocolError(ErrorCode.RESOURCES, f"artifacts need {total_bytes:,} bytes of disk, {free_disk:,} free")
    if total_bytes > free_ram:
        raise ProtocolError(ErrorCode.RESOURCES, f"artifacts need {total_bytes:,} bytes of RAM, {free_ram:,} available")


def describe_device(state_dir: str, sysfs_root: str) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "board": sensors.board_model(),
        "state_dir": state_dir,
        "sysfs_root": sysfs_root,
    }
