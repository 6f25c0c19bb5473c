"""Real training for simulated devices: a few warm TensorFlow workers serve every virtual device.

``edgeprune simulate --trainer tf`` runs N real agents (own MQTT connection,
presence, codec, outbox, acks) in one process; their training requests go to a
:class:`WorkerPool` of W spawned children, each holding TensorFlow once. A
child keeps one compiled, pruning-wrapped model per run and swaps in the
requesting device's own shard before each round; that is the same computation
as a device of its own, because every round starts from the global weights and
masks and resets the optimizer (see :meth:`edge_agent.worker.Run.round`).
Memory grows with W (TensorFlow, the model) and with the data, not with N.

Threads and processes: each simulated agent's job thread calls
:meth:`PoolTrainer.round`, which blocks until one of the W children is free
(a queue hands out idle children; one request per child at a time). The
children are spawned (a fresh interpreter) and never touch MQTT.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from .common.childproc import Child, ChildGone, ChildTimeout
from .protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger("edge_agent.simtrain")
BEGIN_TIMEOUT_S = 600.0
ROUND_TIMEOUT_S = 3600.0
DATA_KEYS = ("data", "data_shard", "data_partition", "data_alpha", "data_seed", "data_label_column")


def _child_main(conn, threads: int) -> None:
    """A pool child: ``begin`` (run id, device data spec, the begin message) and ``round`` requests."""
    import functools

    from .common.childproc import serve
    from .ml import data
    from .ml.data import load_local
    from .ml.tfenv import load
    from .worker import Run

    load(threads)
    # the pool serves many devices' shards of one data set: read its files once per child, not once per device
    data.read_fashion_mnist = functools.lru_cache(maxsize=2)(data.read_fashion_mnist)
    runs: dict[str, Run] = {}
    shards: dict[str, Any] = {}

    def handle(msg: dict[str, Any]) -> dict[str, Any]:
        key = repr(sorted(msg["data"].items()))
        if key not in shards:  # a device's shard, computed once (the full data set is cached by load_local)
            shards[key] = load_local(msg["data"])
        run = runs.get(msg["run_id"])
        if run is None or run.begin_key != msg["begin_key"]:  # a new run, or a new architecture
            runs.clear()  # one run at a time: the previous run's model goes
            run = runs[msg["run_id"]] = Run(msg["begin"], msg["data"], preloaded=shards[key])
            run.begin_key = msg["begin_key"]
        run.use_data(shards[key])
        if msg["op"] == "begin":
            return {"ok": True, **run.info()}
        return {"ok": True, **run.round(msg["round"])}

    serve(conn, handle)  # until the parent ends it or goes away


class WorkerPool:
    """W warm TensorFlow children shared by every simulated device of this process."""

    def __init__(self, workers: int, threads: int = 1):
        if workers < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.workers, self.threads = workers, threads
        self._idle: queue.Queue[Child] = queue.Queue()
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self.begins: dict[str, dict[str, Any]] = {}  # run id -> its begin message (what a child needs)

    def _ensure(self) -> None:
        with self._lock:
            while len(self._children) < self.workers:
                child = Child(_child_main, (self.threads,), f"edgeprune-sim-worker-{len(self._children)}")
                self._children.append(child)
                self._idle.put(child)

    def request(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self._ensure()
        child = self._idle.get()
        try:
            reply = child.request(msg, timeout_s)
        except (ChildGone, ChildTimeout) as exc:
            with self._lock:  # replace the dead child; the request fails
                self._children.remove(child)
            child = None
            raise ProtocolError(ErrorCode.INTERNAL, f"simulated-device training worker failed: {exc}") from None
        finally:
            if child is not None:
                self._idle.put(child)
        if not reply.get("ok"):
            raise ProtocolError(ErrorCode.coerce(reply.get("code")), reply.get("message") or "training failed")
        return reply

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children if c.pid is not None]

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
        for child in children:
            try:
                child.request({"op": "end"}, 10.0)
            except (ChildGone, ChildTimeout):
                pass


class PoolTrainer:
    """Stands in for :class:`~edge_agent.trainer.Trainer` on one simulated device: same calls, real
    TF-MOT training on this device's shard, in the shared pool."""

    alive = True
    pid = None

    def __init__(self, pool: WorkerPool, data: dict[str, Any]):
        self.pool = pool
        self.data = {k: data.get(k) for k in DATA_KEYS}
        self.run_id: str | None = None

    def prepare(self, run_id: str) -> bool:
        self.run_id = run_id
        return False

    def begin(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        begin_key = f"{run_id}:{hash(repr(sorted(msg.items())))}"
        self.pool.begins[run_id] = msg
        reply = self.pool.request(
            {"op": "begin", "run_id": run_id, "begin": msg, "begin_key": begin_key, "data": self.data}, BEGIN_TIMEOUT_S
        )
        self.run_id, self._begin_key = run_id, begin_key
        reply.pop("ok", None)
        return {**reply, "begin_s": round(time.perf_counter() - t0, 3), "worker_pid": None, "pooled": True}

    def round(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        if run_id != self.run_id:
            raise ProtocolError(ErrorCode.BAD_ARGS, f"run {run_id} has not begun on this device (send train_begin)")
        reply = self.pool.request(
            {
                "op": "round",
                "run_id": run_id,
                "begin": self.pool.begins[run_id],
                "begin_key": self._begin_key,
                "data": self.data,
                "round": msg,
            },
            ROUND_TIMEOUT_S,
        )
        reply.pop("ok", None)
        reply["metrics"]["worker_restarted"] = False
        return reply

    def kill_now(self) -> None:
        pass

    def close(self, kill: bool = False) -> None:
        self.run_id = None
