"""One client's update: fetch, decode, run/round check, validate, norm check, clip, dedupe, ack, store."""

from __future__ import annotations

from edge_agent.protocol import codec
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.messages import Reply

from ..strategy import MaskedFedAvg, UpdateRejected, check_norm, clip_update
from .record import Run, Sent, Timer
from .structured import fold_importance


def intake(
    run: Run,
    rnd: int,
    dev: str,
    reply: Reply,
    targets: list[float],
    agg: MaskedFedAvg,
    t: Timer,
    sent: Sent,
) -> str | None:
    """Pull, check and aggregate one client's update. Returns an error text, or None."""
    s, gm = run.session, run.gm
    if not reply.ok:
        run.store.save_client_round(
            run.run_id, rnd, dev, False, None, None, None, f"{reply.error_code}: {reply.error_message}"
        )
        return f"{reply.error_code}: {reply.error_message}"
    if (dev, rnd) in run.counted:
        s.acknowledge(reply)
        return None  # counted once per (device, round)
    result = reply.result or {}
    try:
        with t("transfer"):
            data = s.fetch_blob(
                dev,
                result["update"]["sha256"],
                timeout_s=run.cfg.round_timeout_s,
                expected_bytes=result["update"]["bytes"],
            )
        with t("decode"):
            upd = codec.decode(data, reference=gm.weights, reference_masks=gm.masks)
            if upd.meta.get("round") != rnd or upd.meta.get("run_id") != run.run_id:
                raise UpdateRejected(f"update is for run {upd.meta.get('run_id')} round {upd.meta.get('round')}")
            agg.validate(upd.tensors, upd.masks, targets)
            check_norm(upd.tensors, gm.weights, run.cfg.max_norm_ratio, run.norm)
        with t("aggregate"):
            tensors = clip_update(upd.tensors, gm.weights, run.cfg.clip_norm) if run.cfg.clip_norm else upd.tensors
            agg.add(tensors, upd.masks, float(result["metrics"]["num_samples"]))
    except (ProtocolError, UpdateRejected, KeyError, TypeError) as exc:
        if isinstance(exc, UpdateRejected):
            s.acknowledge(reply)  # a definitive no: sending it again will not help
        msg = f"update rejected: {exc}"
        run.store.save_client_round(run.run_id, rnd, dev, False, None, None, result.get("metrics"), msg)
        return msg
    run.counted.add((dev, rnd))
    if "importance" in result["metrics"]:
        fold_importance(run, dev, result["metrics"]["importance"], float(result["metrics"]["num_samples"]))
    s.acknowledge(reply)  # the device may drop it from its outbox now
    sent.bytes_up[dev] = len(data)
    sent.device_metrics[dev] = result["metrics"]
    run.store.save_client_round(
        run.run_id, rnd, dev, True, result["metrics"].get("model_bytes"), len(data), result["metrics"], None
    )
    return None
