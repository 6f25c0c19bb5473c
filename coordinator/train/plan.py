"""Who trains: the fleet check before round 1 (waiting once for --wait-for), and each round's clients."""

from __future__ import annotations

import concurrent.futures as cf
import math
import random
import zlib
from typing import Any

from edge_agent.protocol.args import TrainBegin
from edge_agent.protocol.errors import EdgepruneError

from ..fleet import is_live, training_blocker
from .record import Run

BEGIN_TIMEOUT_S = 600.0
CAPS_WAIT_S = 5.0


class NoDevices(EdgepruneError, RuntimeError):
    """No device of the fleet can train (or too few for --min-clients): nothing was started."""

    code = "no_devices"


def plan_fleet(run: "Run") -> list[str]:
    """Who trains: waits once for --wait-for (saying who is online meanwhile), then names the devices it
    will use and why each other one cannot. Raises :class:`NoDevices` (listing the fleets this broker
    has) when fewer than --min-clients can train."""
    s, cfg, say = run.session, run.cfg, run.reporter
    if cfg.wait_for_devices:
        last = [-1]

        def enough(rows: list[dict[str, Any]]) -> bool:
            ready = [r["device_id"] for r in rows if training_blocker(r) is None]
            if len(ready) != last[0]:
                last[0] = len(ready)
                say.say(
                    f"waiting for {cfg.wait_for_devices} devices: {len(ready)} ready"
                    + (f" ({', '.join(ready)})" if ready else "")
                )
            return len(ready) >= cfg.wait_for_devices

        if not s.wait_for(enough, cfg.wait_timeout_s):
            ready = len([r for r in s.device_table() if training_blocker(r) is None])
            if ready < cfg.min_clients:
                raise NoDevices(
                    f"only {ready} of the {cfg.wait_for_devices} devices asked for (--wait-for) were "
                    f"ready after {cfg.wait_timeout_s:.0f} s, fewer than --min-clients {cfg.min_clients}"
                )
            say.warn(
                f"only {ready} of {cfg.wait_for_devices} devices ready after {cfg.wait_timeout_s:.0f} s; going "
                f"on with them (--min-clients {cfg.min_clients} allows it)"
            )
    # a device that just came online announces its capabilities a moment later: give them time
    s.wait_for(lambda rows: all(r["caps"] is not None for r in rows if is_live(r)), CAPS_WAIT_S)
    rows = s.fleet_rows()
    blocked = {r["device_id"]: training_blocker(r) for r in rows}
    if cfg.devices:
        for dev in cfg.devices:
            if dev not in blocked:
                blocked[dev] = "not in this fleet (no such device seen on the broker or in the registry)"
        blocked = {d: why for d, why in blocked.items() if d in cfg.devices}
    usable = sorted(d for d, why in blocked.items() if why is None)
    for dev, why in sorted(blocked.items()):
        if why is not None:
            say.warn(f"{dev} will not train: {why}")
    if len(usable) < cfg.min_clients:
        fleets = s.fleets_seen()
        others = ", ".join(f"{f} ({n} devices)" for f, n in fleets.items()) or "none"
        reasons = "; ".join(f"{d}: {why}" for d, why in sorted(blocked.items()) if why)
        raise NoDevices(
            f"{len(usable)} devices of fleet {s.fleet!r} can train, --min-clients is {cfg.min_clients}"
            + (f" ({reasons})" if reasons else "")
            + f"; fleets on this broker: {others}"
        )
    say.say(f"training on {len(usable)} devices: {', '.join(usable)}")
    return usable


def eligible(run: Run) -> list[str]:
    """Devices that may train this round (busy ones included: busy with this run's last round)."""
    s, cfg = run.session, run.cfg
    rows = [r for r in s.device_table() if is_live(r) and r["can_train"] and r.get("has_data") is not False]
    if cfg.devices:
        rows = [r for r in rows if r["device_id"] in cfg.devices]
    return sorted(r["device_id"] for r in rows)


def begin_clients(run: Run, devices: list[str]) -> None:
    """Start a warm training worker on each device (in parallel); drop those that cannot."""
    new = [d for d in devices if d not in run.begun]
    if not new:
        return
    arch = run.session.publish_blob(run.gm.arch_json.encode("utf-8"))
    args = TrainBegin(
        run_id=run.run_id,
        arch=arch,
        pruning=run.cfg.pruning_on,
        training=run.gm.training,
        granularity=run.cfg.granularity,
        lr=run.cfg.lr,
        optimizer=run.cfg.optimizer,
    )
    futures = {d: run.session.submit(d, "train_begin", args)[1] for d in new}
    for dev, fut in futures.items():
        try:
            reply = fut.result(BEGIN_TIMEOUT_S)
        except cf.TimeoutError:
            run.reporter.warn(f"{dev}: no answer to train_begin within {BEGIN_TIMEOUT_S:.0f} s")
            continue
        if reply.ok:
            run.begun[dev] = reply.result
        else:
            run.reporter.warn(f"{dev} cannot train: {reply.error_code}: {reply.error_message}")
    run.reporter.say(
        f"{len(run.begun)} devices training: "
        + ", ".join(f"{d} ({r['num_samples']} samples)" for d, r in sorted(run.begun.items()))
    )


def select_clients(run: Run, rnd: int) -> list[str]:
    cfg = run.cfg
    online = eligible(run)
    begin_clients(run, online)  # devices that joined since the run began
    pool = [d for d in online if d in run.begun]
    k = len(pool)
    if cfg.clients_per_round:
        k = min(k, cfg.clients_per_round)
    elif cfg.fraction:
        k = min(k, max(1, math.ceil(cfg.fraction * len(pool))))
    return sorted(random.Random(cfg.seed * 7919 + rnd).sample(pool, k))


def client_seed(seed: int, rnd: int, device_id: str) -> int:
    """Each client's local shuffling seed: fixed by the run's seed, the round and the device."""
    return seed * 1_000_003 + rnd * 1009 + zlib.crc32(device_id.encode())
