"""A simulated fleet: many real agents in one process, with a synthetic trainer or real training.

Each simulated device is a full :class:`~edge_agent.daemon.Agent` (its own MQTT
connection, presence, heartbeats, command handling, blob transfer, outbox and
acknowledgements); only the TensorFlow worker is replaced by
:class:`SyntheticTrainer`, which answers a round after a configurable delay with
a correctly shaped sparse update of the global model it was sent (masks that
meet the round's per-tensor targets, encoded with the real codec). So a scale
test exercises the coordinator and the broker exactly as a fleet of that size
would, without a fleet's worth of TensorFlow.

One update is computed per process per round and reused by its agents (each
still stores, uploads and is acknowledged for its own copy): the simulator's
CPU goes to the protocol, which is what is being measured, not to arithmetic.
With ``--trainer tf`` the devices really train, each on its own shard, in a
pool of warm TensorFlow workers (:mod:`.simtrain`): memory bounded by the pool.

Threads and processes: every agent has its MQTT supervisor and paho network
thread, a job thread, a heartbeat thread and a small io pool (see
:mod:`.daemon`); with ``--trainer tf`` the process also owns the pool's
spawned TensorFlow children.

Run by ``edgeprune simulate`` as ``python -m edge_agent.simulate``; it prints
one JSON line when all its agents are connected, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import caps, commands  # noqa: F401  (commands: registers the training commands)
from .daemon import Agent
from .protocol import codec
from .protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger("edge_agent.simulate")
UPDATE_NOISE = 0.01  # std of the synthetic weight change
SIM_KEEPALIVE_S = 60  # hundreds of agents share an interpreter: a busy one is slow to ping, not dead


class UpdateCache:
    """The synthetic update for one (model, round, format, targets), shared by a process's agents."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._update: bytes | None = None

    def get(self, msg: dict[str, Any]) -> bytes:
        import hashlib

        key = (
            hashlib.sha256(msg["model"]).hexdigest(),
            msg.get("round"),
            msg.get("update_format"),
            json.dumps(msg.get("targets") or {}, sort_keys=True),
        )
        with self._lock:
            if key != self._key:
                self._update, self._key = synthetic_update(msg), key
            return self._update


def synthetic_update(msg: dict[str, Any]) -> bytes:
    """A plausible local update: the global weights plus noise, pruned by magnitude within the
    global mask down to each tensor's target (what the coordinator checks), encoded as agents do."""
    try:
        glob = codec.decode(msg["model"])
    except ProtocolError as exc:
        raise ProtocolError(ErrorCode.INTEGRITY, f"global model does not decode: {exc}") from None
    rng = np.random.default_rng(int(msg.get("seed", 0)))
    targets = msg.get("targets") or {}
    weights, masks = [], []
    for name, w, ref in zip(glob.names, glob.tensors, glob.masks):
        new = (w + rng.normal(0.0, UPDATE_NOISE, w.shape)).astype(np.float32)
        if ref is None:
            weights.append(new)
            masks.append(None)
            continue
        keep = ref.copy()
        if name in targets:
            k = max(int(round(keep.size * (1.0 - float(targets[name])))), 1)  # TF-MOT's count
            if int(keep.sum()) > k:
                score = np.where(keep, np.abs(new), -1.0).ravel()
                keep = np.zeros(keep.size, bool)
                keep[np.argpartition(score, -k)[-k:]] = True
                keep = keep.reshape(ref.shape)
        weights.append(new * keep)
        masks.append(keep)
    return codec.encode_update(
        weights,
        names=glob.names,
        masks=masks,
        reference=glob.tensors,
        reference_masks=glob.masks,
        values=msg.get("update_format", "int8"),
        pruned=any(m is not None for m in masks),
        meta={"run_id": msg.get("run_id"), "round": msg.get("round")},
        seed=int(msg.get("seed", 0)),
    )


def synthetic_importance(model: bytes, layers: list[str]) -> dict[str, Any]:
    """Per-unit statistics of the right length for each requested layer (weight L1 norm)."""
    glob = codec.decode(model)
    kernels = {n.rsplit("/", 1)[0]: t for n, t in zip(glob.names, glob.tensors) if n.endswith("/kernel")}
    out = {}
    for layer in layers:
        k = kernels.get(layer)
        if k is not None:
            out[layer] = [round(float(v), 7) for v in np.abs(k).sum(axis=tuple(range(k.ndim - 1)))]
    return {"method": "l1", "layers": out}


class SyntheticTrainer:
    """Stands in for :class:`~edge_agent.trainer.Trainer`: same calls, no TensorFlow, no child process."""

    alive = False
    pid = None

    def __init__(self, delay_s: float, num_samples: int, cache: UpdateCache):
        self.delay_s = delay_s
        self.num_samples = num_samples
        self.cache = cache
        self.run_id: str | None = None

    def prepare(self, run_id: str) -> bool:
        self.run_id = run_id
        return False

    def begin(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("granularity", "unstructured") != "unstructured":
            raise ProtocolError(
                ErrorCode.UNSUPPORTED,
                f"simulated devices make unstructured masks only, not " f"{msg.get('granularity')}",
            )
        self.run_id = run_id
        return {
            "num_samples": self.num_samples,
            "dataset": "synthetic",
            "synthetic": True,
            "begin_s": 0.0,
            "worker_pid": None,
        }

    def round(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        if run_id != self.run_id:
            raise ProtocolError(ErrorCode.BAD_ARGS, f"run {run_id} has not begun on this device (send train_begin)")
        t0 = time.perf_counter()
        update = self.cache.get(msg)
        metrics = {
            "num_samples": self.num_samples,
            "synthetic": True,
            "update_bytes": len(update),
            "worker_restarted": False,
        }
        if msg.get("importance"):  # structured steps: the L1 norm of each unit's weights stands in
            metrics["importance"] = synthetic_importance(msg["model"], msg["importance"].get("layers") or [])
        time.sleep(max(0.0, self.delay_s - (time.perf_counter() - t0)))
        wall = round(time.perf_counter() - t0, 4)
        return {"update": update, "metrics": {**metrics, "train_s": wall, "wall_s": wall}}

    def kill_now(self) -> None:
        pass

    def close(self, kill: bool = False) -> None:
        self.run_id = None


class SimulatedAgent(Agent):
    KEEP_LOGS = False

    def __init__(self, settings: dict[str, Any], trainer: SyntheticTrainer, base_caps):
        super().__init__(settings)
        self.trainer = trainer
        self._base_caps = base_caps

    def capabilities(self):
        return dataclasses.replace(
            self._base_caps,
            device_id=self.device_id,
            can_train=True,
            has_data=True,
            train_stack={"synthetic": "simulated (edge_agent.simulate)"},
            ts=time.time(),
        )


def raise_fd_limit() -> int:
    """Each MQTT client holds a socket and a wake-up socket pair: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    from . import settings as settings_mod

    p = argparse.ArgumentParser(prog="python -m edge_agent.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", default="sim")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--first", type=int, default=0, help="index of the first device (ids are PREFIX-00000 ...)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--delay", type=float, default=1.0, help="seconds a synthetic round takes")
    p.add_argument("--samples", type=int, default=100, help="samples each device claims (aggregation weight)")
    p.add_argument("--state-root", required=True)
    p.add_argument("--heartbeat-s", type=float, default=None)
    p.add_argument("--keepalive-s", type=int, default=SIM_KEEPALIVE_S)
    p.add_argument("--username", default=None, help="MQTT user name; the password comes from EDGEPRUNE_PASSWORD")
    p.add_argument(
        "--trainer",
        choices=("synthetic", "tf"),
        default="synthetic",
        help="synthetic updates (no TensorFlow), or real TF-MOT training in a pool of --workers",
    )
    p.add_argument("--workers", type=int, default=1, help="tf: TensorFlow workers shared by this process's devices")
    p.add_argument("--total", type=int, default=None, help="tf: devices in the whole simulated fleet (shard count)")
    p.add_argument("--data", default="digits", help="tf: built-in data set the devices' shards come from")
    p.add_argument("--partition", default="iid", help="tf: iid, dirichlet:ALPHA or classes:C")
    p.add_argument("--data-seed", type=int, default=0, help="tf: seed of the partition (the same for every device)")
    p.add_argument("--train-threads", type=int, default=1, help="tf: TensorFlow threads per worker")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fds = raise_fd_limit()
    if fds < 3 * a.count + 64:
        print(
            f"simulate: {a.count} agents need ~{3 * a.count} file descriptors, the limit is {fds}; "
            "use more --processes",
            file=sys.stderr,
        )
        return 2
    cache = UpdateCache()
    pool = None
    if a.trainer == "tf":
        from .simtrain import PoolTrainer, WorkerPool

        pool = WorkerPool(a.workers, a.train_threads)
    total = a.total or (a.first + a.count)
    cli = {k: v for k, v in (("heartbeat_s", a.heartbeat_s), ("keepalive_s", a.keepalive_s)) if v is not None}
    if a.username:  # the one credential taken from outside: password authentication on a shared broker
        cli |= {"username": a.username, "password": os.environ.get("EDGEPRUNE_PASSWORD", "")}
    agents: list[SimulatedAgent] = []
    # defaults, not the machine's agent.toml or EDGEPRUNE_* environment: these are not this host's agent
    defaults = {st.name: st.default for st in settings_mod.SETTINGS} | {"config_path": None}
    base = None
    t0 = time.perf_counter()
    for i in range(a.first, a.first + a.count):
        device = f"{a.prefix}-{i:05d}"
        values = settings_mod.validate(
            {
                **defaults,
                "broker": a.broker,
                "fleet": a.fleet,
                "device_id": device,
                "state_dir": str(Path(a.state_root) / device),
                **cli,
            }
        )
        if base is None:
            base = caps.collect(device, values["state_dir"])
        if pool is not None:  # this device's own shard of the data, trained for real in the shared pool
            data = {
                "data": a.data,
                "data_shard": f"{i}/{total}",
                "data_partition": a.partition,
                "data_seed": a.data_seed,
                "data_alpha": values["data_alpha"],
                "data_label_column": values["data_label_column"],
            }
            trainer = PoolTrainer(pool, data)
        else:
            trainer = SyntheticTrainer(a.delay, a.samples, cache)
        agents.append(SimulatedAgent(values, trainer, base))
    for agent in agents:
        agent.start()
    deadline = time.monotonic() + 60 + 0.05 * a.count
    while time.monotonic() < deadline and not all(ag.link.connected.is_set() for ag in agents):
        time.sleep(0.05)
    connected = sum(ag.link.connected.is_set() for ag in agents)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "agents": a.count,
                "connected": connected,
                "connect_s": round(time.perf_counter() - t0, 3),
            }
        ),
        flush=True,
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # `edgeprune simulate` is gone (killed): do not linger as a fleet
            break
    with ThreadPoolExecutor(32) as stopper:  # each says "offline" itself; in parallel, or 1,000 take a while
        list(stopper.map(lambda ag: ag.stop(), agents))
    if pool is not None:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
