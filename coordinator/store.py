"""The coordinator's SQLite database: fleet registry, runs, rounds, per-client results.

One file under the coordinator home. Every method opens a short transaction
under a lock, so the MQTT thread (presence) and the round loop can share it.
JSON columns hold the flexible parts; the columns are what gets queried.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    status_json TEXT,
    caps_json TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL,
    PRIMARY KEY (fleet, device_id)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    config_json TEXT NOT NULL,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    metrics_json TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS client_rounds (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    ok INTEGER NOT NULL,
    bytes_down INTEGER,
    bytes_up INTEGER,
    metrics_json TEXT,
    error TEXT,
    PRIMARY KEY (run_id, round, device_id)
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    format TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    gzip_bytes INTEGER NOT NULL,
    sparsity REAL NOT NULL,
    info_json TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS bench_results (
    bench_id TEXT NOT NULL,
    run_id TEXT,
    device_id TEXT NOT NULL,
    artifact TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    result_json TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (bench_id, device_id, artifact)
);
"""


def default_home() -> Path:
    env = os.environ.get("EDGEPRUNE_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "edgeprune"


class RunNotFound(LookupError):
    """A run reference that matches no run, or more than one."""


class Store:
    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "edgeprune.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: no fsync per commit (a heartbeat from each of 1,000 devices is ~100 commits/s);
            # still never corrupt, and an application crash loses nothing; a power cut may lose the last commits
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, params: tuple = ()) -> None:
        with self._lock, self._db:
            self._db.execute(sql, params)

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params))

    # -- devices ---------------------------------------------------------
    def upsert_device(
        self,
        fleet: str,
        device_id: str,
        state: str,
        *,
        status: dict | None = None,
        caps: dict | None = None,
        seen: float | None = None,
    ) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO devices(fleet, device_id, state, first_seen) VALUES (?,?,?,?) "
                "ON CONFLICT(fleet, device_id) DO NOTHING",
                (fleet, device_id, state, now),
            )
            self._db.execute("UPDATE devices SET state=? WHERE fleet=? AND device_id=?", (state, fleet, device_id))
            if status is not None:
                self._db.execute(
                    "UPDATE devices SET status_json=? WHERE fleet=? AND device_id=?",
                    (json.dumps(status), fleet, device_id),
                )
            if caps is not None:
                self._db.execute(
                    "UPDATE devices SET caps_json=? WHERE fleet=? AND device_id=?", (json.dumps(caps), fleet, device_id)
                )
            if seen is not None:
                self._db.execute(
                    "UPDATE devices SET last_seen=? WHERE fleet=? AND device_id=?", (seen, fleet, device_id)
                )

    def delete_device(self, fleet: str, device_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM devices WHERE fleet=? AND device_id=?", (fleet, device_id))

    def devices(self, fleet: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM devices WHERE fleet=? ORDER BY device_id", (fleet,))
        out = []
        for r in rows:
            out.append(
                {
                    "device_id": r["device_id"],
                    "state": r["state"],
                    "first_seen": r["first_seen"],
                    "last_seen": r["last_seen"],
                    "status": json.loads(r["status_json"]) if r["status_json"] else None,
                    "caps": json.loads(r["caps_json"]) if r["caps_json"] else None,
                }
            )
        return out

    # -- runs ------------------------------------------------------------
    def create_run(self, run_id: str, fleet: str, kind: str, config: dict) -> None:
        self._exec(
            "INSERT INTO runs(run_id, fleet, kind, state, created, config_json) VALUES (?,?,?,?,?,?)",
            (run_id, fleet, kind, "running", time.time(), json.dumps(config)),
        )

    def set_run_state(self, run_id: str, state: str) -> None:
        self._exec("UPDATE runs SET state=? WHERE run_id=?", (state, run_id))

    def finish_run(self, run_id: str, state: str, summary: dict) -> None:
        self._exec(
            "UPDATE runs SET state=?, finished=?, summary_json=? WHERE run_id=?",
            (state, time.time(), json.dumps(summary), run_id),
        )

    def runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM runs" + (" WHERE kind=?" if kind else "") + " ORDER BY created DESC"
        return [self._run_dict(r) for r in self._query(sql, (kind,) if kind else ())]

    def run(self, run_id: str) -> dict[str, Any] | None:
        """A run by id, unique prefix or suffix, or ``latest``; None if none or several match."""
        try:
            return self.resolve_run(run_id)
        except RunNotFound:
            return None

    def resolve_run(self, ref: str, kind: str | None = None) -> dict[str, Any]:
        """A run by id, unique prefix or suffix, or ``latest``; :class:`RunNotFound` says which runs
        matched when the reference is ambiguous, and how to list them when none does."""
        sql, params = (
            "SELECT * FROM runs" + (" WHERE kind=?" if kind else "") + " ORDER BY created DESC",
            ((kind,) if kind else ()),
        )
        rows = self._query(sql, params)
        what = f"{kind} run" if kind else "run"
        if ref == "latest":
            if not rows:
                raise RunNotFound(f"there is no {what} yet in {self.home}")
            return self._run_dict(rows[0])
        exact = [r for r in rows if r["run_id"] == ref]
        matches = exact or [r for r in rows if r["run_id"].startswith(ref) or r["run_id"].endswith(ref)]
        if len(matches) == 1:
            return self._run_dict(matches[0])
        if not matches:
            raise RunNotFound(f"no {what} {ref!r} in {self.home} (edgeprune runs lists them)")
        ids = ", ".join(r["run_id"] for r in matches[:8]) + (" ..." if len(matches) > 8 else "")
        raise RunNotFound(f"{ref!r} matches {len(matches)} runs: {ids}; give more of the id")

    def delete_run(self, run_id: str) -> None:
        for table in ("client_rounds", "rounds", "artifacts", "runs"):
            self._exec(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
        self._exec("DELETE FROM bench_results WHERE run_id=? OR bench_id=?", (run_id, run_id))

    @staticmethod
    def _run_dict(r: sqlite3.Row) -> dict[str, Any]:
        return {
            "run_id": r["run_id"],
            "fleet": r["fleet"],
            "kind": r["kind"],
            "state": r["state"],
            "created": r["created"],
            "finished": r["finished"],
            "config": json.loads(r["config_json"]),
            "summary": json.loads(r["summary_json"]) if r["summary_json"] else None,
        }

    # -- rounds ----------------------------------------------------------
    def save_round(self, run_id: str, rnd: int, started: float, metrics: dict) -> None:
        self._exec(
            "INSERT OR REPLACE INTO rounds(run_id, round, started, finished, metrics_json) VALUES (?,?,?,?,?)",
            (run_id, rnd, started, time.time(), json.dumps(metrics)),
        )

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,))
        return [
            {
                "round": r["round"],
                "started": r["started"],
                "finished": r["finished"],
                **json.loads(r["metrics_json"] or "{}"),
            }
            for r in rows
        ]

    def save_client_round(
        self,
        run_id: str,
        rnd: int,
        device_id: str,
        ok: bool,
        bytes_down: int | None,
        bytes_up: int | None,
        metrics: dict | None,
        error: str | None,
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO client_rounds VALUES (?,?,?,?,?,?,?,?)",
            (
                run_id,
                rnd,
                device_id,
                int(ok),
                bytes_down,
                bytes_up,
                json.dumps(metrics) if metrics is not None else None,
                error,
            ),
        )

    def client_rounds(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM client_rounds WHERE run_id=? ORDER BY round, device_id", (run_id,))
        return [
            {
                "round": r["round"],
                "device_id": r["device_id"],
                "ok": bool(r["ok"]),
                "bytes_down": r["bytes_down"],
                "bytes_up": r["bytes_up"],
                "metrics": json.loads(r["metrics_json"]) if r["metrics_json"] else None,
                "error": r["error"],
            }
            for r in rows
        ]

    # -- artifacts and benchmark results ---------------------------------
    def save_artifact(self, run_id: str, rec: dict) -> None:
        self._exec(
            "INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                run_id,
                rec["name"],
                rec["format"],
                rec["path"],
                rec["sha256"],
                rec["bytes"],
                rec["gzip_bytes"],
                rec["sparsity"],
                json.dumps(rec),
                time.time(),
            ),
        )

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT info_json FROM artifacts WHERE run_id=? ORDER BY created, name", (run_id,))
        return [json.loads(r["info_json"]) for r in rows]

    def save_bench_result(self, bench_id: str, run_id: str | None, device_id: str, result: dict) -> None:
        self._exec(
            "INSERT OR REPLACE INTO bench_results VALUES (?,?,?,?,?,?,?)",
            (
                bench_id,
                run_id,
                device_id,
                result["artifact"],
                result.get("sha256") or "",
                json.dumps(result),
                time.time(),
            ),
        )

    def bench_results(self, run_id: str | None = None, bench_id: str | None = None) -> list[dict[str, Any]]:
        if bench_id is not None:
            rows = self._query("SELECT * FROM bench_results WHERE bench_id=? ORDER BY created", (bench_id,))
        else:
            rows = self._query("SELECT * FROM bench_results WHERE run_id=? ORDER BY created", (run_id,))
        return [
            {
                "bench_id": r["bench_id"],
                "run_id": r["run_id"],
                "device_id": r["device_id"],
                **json.loads(r["result_json"]),
            }
            for r in rows
        ]
