"""A fleet in this process over the in-memory broker: real Agents, a real Session, no sockets.

Each device is a :class:`~edge_agent.simulate.SimulatedAgent` (the whole agent: presence,
commands, blob transfer, outbox, acks) whose trainer answers with the simulator's synthetic
update; :class:`Behaviour` makes one fail, stall or vanish mid-round, so the round loop's
policy can be tested in a second, against the same code paths a Mosquitto fleet takes.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from coordinator.session import Session
from coordinator.store import Store
from edge_agent import caps
from edge_agent import settings as settings_mod
from edge_agent.common.memlink import MemoryBroker
from edge_agent.protocol import codec
from edge_agent.protocol.errors import ErrorCode, ProtocolError
from edge_agent.simulate import SimulatedAgent, SyntheticTrainer, UpdateCache

_names = itertools.count()


@dataclasses.dataclass
class Behaviour:
    """How one device's training goes wrong, from round ``from_round`` on."""

    fail: bool = False  # an error reply instead of an update
    forget: bool = False  # with fail: it also loses the global models it held (never had this round's)
    stall_s: float = 0.0  # answer this much later (past a round timeout)
    vanish: bool = False  # its connection dies mid-round, as a device that loses power
    shift: float = 0.0  # every kept weight of its update moved by this much (a poisoned update)
    from_round: int = 1
    to_round: int = 10**9


class FaultyTrainer(SyntheticTrainer):
    def __init__(self, agent_ref: list, behaviour: Behaviour, cache: UpdateCache):
        super().__init__(0.0, 100, cache)
        self.agent_ref, self.behaviour = agent_ref, behaviour

    def round(self, run_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        b = self.behaviour
        if b.from_round <= msg.get("round", 0) <= b.to_round:
            if b.fail:
                if b.forget:
                    for digest in self.agent_ref[0].held.digests():
                        self.agent_ref[0].held.path(digest).unlink()
                raise ProtocolError(ErrorCode.INTERNAL, "simulated training failure")
            if b.vanish:
                self.agent_ref[0].link.kill()
                time.sleep(1.0)
            time.sleep(b.stall_s)
        out = super().round(run_id, msg)
        if b.shift and b.from_round <= msg.get("round", 0) <= b.to_round:
            out["update"] = _shifted(out["update"], msg, b.shift)
        return out


def _shifted(update: bytes, msg: dict[str, Any], shift: float) -> bytes:
    glob = codec.decode(msg["model"])
    upd = codec.decode(update, reference=glob.tensors, reference_masks=glob.masks)
    moved = [(t + shift) * (m if m is not None else 1) for t, m in zip(upd.tensors, upd.masks)]
    return codec.encode_update(
        [t.astype("float32") for t in moved],
        names=upd.names,
        masks=upd.masks,
        reference=glob.tensors,
        reference_masks=glob.masks,
        values="fp32",
        pruned=any(m is not None for m in upd.masks),
        meta=upd.meta,
        seed=0,
    )


class MemoryFleet:
    def __init__(self, root: Path, fleet: str = "mem", url: str | None = None):
        self.url = url or f"memory://fleet{next(_names)}"
        self.root, self.fleet = root, fleet
        self.agents: dict[str, SimulatedAgent] = {}
        self.cache = UpdateCache()
        self.session: Session | None = None
        self._base_caps = None

    def add(self, device_id: str, behaviour: Behaviour | None = None, **settings: Any) -> SimulatedAgent:
        defaults = {st.name: st.default for st in settings_mod.SETTINGS} | {"config_path": None}
        values = settings_mod.validate(
            {
                **defaults,
                "broker": self.url,
                "fleet": self.fleet,
                "device_id": device_id,
                "state_dir": str(self.root / device_id),
                "heartbeat_s": 0.2,
                **settings,
            }
        )
        if self._base_caps is None:
            self._base_caps = caps.collect(device_id, values["state_dir"])
        ref: list = []
        trainer = FaultyTrainer(ref, behaviour or Behaviour(), self.cache)
        agent = SimulatedAgent(values, trainer, self._base_caps)
        ref.append(agent)
        agent.start()
        self.agents[device_id] = agent
        return agent

    def connect(self, online: int, **kw: Any) -> Session:
        self.session = Session(self.url, self.fleet, Store(self.root / "home"), **kw).start(5)
        ok = self.session.wait_for(lambda rows: sum(r["state"] == "online" for r in rows) >= online, 10)
        assert ok, self.session.device_table()
        return self.session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        stoppers = [threading.Thread(target=a.stop) for a in self.agents.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(10)
        if self.url.startswith("memory://"):
            MemoryBroker.drop(self.url.removeprefix("memory://"))


@contextmanager
def memory_fleet(root: Path, fleet: str = "mem", url: str | None = None) -> Iterator[MemoryFleet]:
    """Simulated agents in this process: over memory:// unless ``url`` names a real broker."""
    f = MemoryFleet(root, fleet, url)
    try:
        yield f
    finally:
        f.close()
