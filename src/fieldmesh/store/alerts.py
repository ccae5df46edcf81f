"""Alert rules, alert state, alerts with their history, and the notification outbox, in the hot store.

Tables of their own (created on demand, SQLite and PostgreSQL alike):

- ``alert_rules``: one row per rule (its JSON, where it came from: ``api`` or ``file:<path>``), and
  ``alert_rules_version``: a counter bumped in every change's transaction, so processors poll one row.
- ``alert_state``: per (rule, device) what the rule remembers (firing, waiting since, the alert it
  opened, a rate's previous reading or an anomaly's mean and variance); idle pairs have no row.
- ``alerts``: one row per alert (rule, device, severity, labels, state ``open``/``acknowledged``/
  ``cleared``, when and by whom each step, the values). A partial unique index allows **at most one
  active** (not cleared) alert per (rule, device): the schema, not the code, forbids a second.
- ``alert_history``: every step of every alert (open, ack, clear, by whom, note).
- ``alert_outbox``: one row per notification to send (alert, step, target, payload), written in the
  transaction of the step it announces; the notifier marks it delivered, or failed after its tries.

The processor writes state, alerts, history and outbox **in the batch's transaction**
(:func:`apply_evaluation` through :class:`~fieldmesh.store.base.SqlTxn`), so a crash either keeps the
batch with its transitions and notifications or neither. The API's ack and clear write alert, history,
outbox and an ``audit_log`` row in one transaction (:class:`AlertTables`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from fieldmesh.core.errors import ConflictError, NotFoundError
from fieldmesh.store.access import HotTables
from fieldmesh.store.base import SqlTxn, T
from fieldmesh.store.registry import _PG_DDL as _REGISTRY_PG_DDL
from fieldmesh.store.registry import _SQLITE_DDL as _REGISTRY_SQLITE_DDL
from fieldmesh.stream.alerts import AbsenceCandidate, Evaluation, Rule, RuleState, Transition, parse_rule

__all__ = [
    "ALERT_STATES", "AlertTables", "Notification", "absence_candidates", "apply_evaluation", "ensure_tables",
    "load_rules", "load_states", "mark_delivered", "mark_delivered_at", "mark_failed", "next_notifications",
    "rules_version",
]

ALERT_STATES: Final = ("open", "acknowledged", "cleared")
#: Tries of a notification before it is kept as ``failed`` (still listed by the API and counted).
MAX_ATTEMPTS: Final = 8

_COMMON_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS alert_rules (name TEXT PRIMARY KEY, body TEXT NOT NULL, source TEXT NOT NULL,"
    " updated_ms {int} NOT NULL, updated_by TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS alert_rules_version (id INTEGER PRIMARY KEY CHECK (id = 1), version {int} NOT NULL)",
    "INSERT INTO alert_rules_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS alert_state (rule TEXT NOT NULL, device_id TEXT NOT NULL, firing INTEGER NOT NULL,"
    " since_ms {int}, alert_id {int}, aux TEXT NOT NULL, PRIMARY KEY (rule, device_id))",
    "CREATE INDEX IF NOT EXISTS alert_state_device ON alert_state (device_id)",
    "CREATE TABLE IF NOT EXISTS alerts (id {pk}, rule TEXT NOT NULL, device_id TEXT NOT NULL,"
    " severity TEXT NOT NULL, labels TEXT NOT NULL, state TEXT NOT NULL, value DOUBLE PRECISION,"
    " opened_ts_ms {int} NOT NULL, opened_ms {int} NOT NULL, acked_ms {int}, acked_by TEXT, note TEXT,"
    " cleared_ts_ms {int}, cleared_ms {int}, cleared_by TEXT, clear_value DOUBLE PRECISION)",
    "CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_active ON alerts (rule, device_id) WHERE state <> 'cleared'",
    "CREATE INDEX IF NOT EXISTS alerts_device ON alerts (device_id, id)",
    "CREATE INDEX IF NOT EXISTS alerts_opened ON alerts (opened_ms)",
    "CREATE TABLE IF NOT EXISTS alert_history (id {pk}, alert_id {int} NOT NULL, at_ms {int} NOT NULL,"
    " event TEXT NOT NULL, actor TEXT NOT NULL, note TEXT, value DOUBLE PRECISION)",
    "CREATE INDEX IF NOT EXISTS alert_history_alert ON alert_history (alert_id, id)",
    "CREATE TABLE IF NOT EXISTS alert_outbox (id {pk}, alert_id {int} NOT NULL, event TEXT NOT NULL,"
    " target TEXT NOT NULL, payload TEXT NOT NULL, created_ms {int} NOT NULL, status TEXT NOT NULL,"
    " attempts INTEGER NOT NULL, next_ms {int} NOT NULL, delivered_ms {int}, last_error TEXT)",
    "CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (status, next_ms)",
    "CREATE INDEX IF NOT EXISTS alert_outbox_alert ON alert_outbox (alert_id, id)",
)
SQLITE_DDL: Final = tuple(s.format(int="INTEGER", pk="INTEGER PRIMARY KEY AUTOINCREMENT") for s in _COMMON_DDL)
PG_DDL: Final = tuple(s.format(int="BIGINT", pk="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
                      for s in _COMMON_DDL)
_ALERT_COLS: Final = ("id, rule, device_id, severity, labels, state, value, opened_ts_ms, opened_ms, acked_ms,"
                      " acked_by, note, cleared_ts_ms, cleared_ms, cleared_by, clear_value")
_EVENT_OF: Final = {"open": "open", "ack": "acknowledged", "clear": "cleared"}


def _now() -> int:
    return int(time.time() * 1000)


def ensure_tables(tx: SqlTxn) -> None:
    """Create the alert tables (and the registry's, read for absence) where missing."""
    ddl = SQLITE_DDL + _REGISTRY_SQLITE_DDL if tx.dialect == "sqlite" else PG_DDL + _REGISTRY_PG_DDL
    if tx.dialect != "sqlite":
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('fieldmesh-alerts'))")
    for stmt in ddl:
        tx.execute(stmt)


def _alert_dict(r: Sequence[Any]) -> dict[str, Any]:
    return {"id": int(r[0]), "rule": r[1], "device_id": r[2], "severity": r[3], "labels": json.loads(r[4]),
            "state": r[5], "value": r[6], "opened_ts_ms": r[7], "opened_ms": r[8], "acked_ms": r[9],
            "acked_by": r[10], "note": r[11], "cleared_ts_ms": r[12], "cleared_ms": r[13], "cleared_by": r[14],
            "clear_value": r[15]}


# -- rules ---------------------------------------------------------------------------------------
def rules_version(tx: SqlTxn) -> int:
    """The rules' version counter (bumped by every change)."""
    rows = tx.execute("SELECT version FROM alert_rules_version WHERE id = 1")
    return int(rows[0][0]) if rows else 0


def load_rules(tx: SqlTxn) -> tuple[int, list[Rule]]:
    """(version, rules) read in one transaction; a stored rule that no longer parses is skipped."""
    version = rules_version(tx)
    out = []
    for (body,) in tx.execute("SELECT body FROM alert_rules ORDER BY name"):
        try:
            out.append(parse_rule(json.loads(body)))
        except Exception:
            continue
    return version, out


def _bump(tx: SqlTxn) -> None:
    tx.execute("UPDATE alert_rules_version SET version = version + 1 WHERE id = 1")


# -- state ---------------------------------------------------------------------------------------
_json_encode: Final = msgspec.json.Encoder().encode
_aux_decode: Final = msgspec.json.Decoder(tuple[float, ...]).decode


def _aux_json(aux: tuple[float, ...]) -> str:
    """A rule state's ``aux`` as stored: a JSON array. A rate rule writes one per device and batch, so msgspec
    (a sixth of ``json.dumps``'s cost, the check included); a NaN or an infinity, which JSON lacks, as
    ``json.dumps`` writes it."""
    if all(map(math.isfinite, aux)):
        return _json_encode(aux).decode()
    return json.dumps(list(aux))


def _aux_of(text: str) -> tuple[float, ...]:
    try:
        return _aux_decode(text)
    except msgspec.DecodeError:  # NaN or Infinity (json.dumps's extension of JSON)
        return tuple(json.loads(text))


def load_states(tx: SqlTxn, devices: Sequence[str]) -> dict[tuple[str, str], RuleState]:
    """The stored states of every rule for ``devices``."""
    out: dict[tuple[str, str], RuleState] = {}
    if not devices:
        return out
    if tx.dialect == "sqlite":
        rows = tx.execute("SELECT rule, device_id, firing, since_ms, alert_id, aux FROM alert_state"
                          " WHERE device_id IN (SELECT value FROM json_each(?))",
                          (_json_encode(list(devices)).decode(),))
    else:
        rows = tx.execute("SELECT rule, device_id, firing, since_ms, alert_id, aux FROM alert_state"
                          " WHERE device_id = ANY(?)", (list(devices),))
    for rule, dev, firing, since, alert_id, aux in rows:
        out[(rule, dev)] = RuleState(bool(firing), None if since is None else int(since),
                                     None if alert_id is None else int(alert_id), _aux_of(aux))
    return out


def _notify_targets(rule: Rule | None) -> list[dict[str, Any]]:
    return [dict(n) for n in rule.notify] if rule is not None else []


def _enqueue(tx: SqlTxn, alert: Mapping[str, Any], event: str, targets: Sequence[Mapping[str, Any]], now: int,
             actor: str, note: str | None) -> int:
    """Outbox rows of one step of ``alert`` (one per target); their number."""
    if not targets:  # a rule without notification targets: nothing to build
        return 0
    payload = json.dumps({"event": _EVENT_OF[event], "at_ms": now, "actor": actor, "note": note, "alert": alert},
                         sort_keys=True)
    rows = [(alert["id"], _EVENT_OF[event], json.dumps(dict(t), sort_keys=True), payload, now, "pending", 0, now)
            for t in targets]
    tx.executemany("INSERT INTO alert_outbox (alert_id, event, target, payload, created_ms, status, attempts,"
                   " next_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def _history(tx: SqlTxn, alert_id: int, event: str, now: int, actor: str, note: str | None,
             value: float | None) -> None:
    tx.execute("INSERT INTO alert_history (alert_id, at_ms, event, actor, note, value) VALUES (?, ?, ?, ?, ?, ?)",
               (alert_id, now, _EVENT_OF[event], actor, note, value))


def _get(tx: SqlTxn, alert_id: int) -> dict[str, Any] | None:
    rows = tx.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,))
    return _alert_dict(rows[0]) if rows else None


@dataclass(frozen=True, slots=True)
class Applied:
    """What :func:`apply_evaluation` wrote: alerts opened and cleared, notifications queued, opens refused
    by the one-active-alert index (an alert was active already: nothing new, nothing sent)."""

    opened: int = 0
    cleared: int = 0
    notifications: int = 0
    refused: int = 0
    claimed: tuple[Notification, ...] = ()  # notifications claimed (leased) in the same transaction


def apply_evaluation(tx: SqlTxn, ev: Evaluation, rules: Mapping[str, Rule], *, now_ms: int | None = None,
                     actor: str = "rule") -> Applied:
    """Write an evaluation's transitions (alerts, history, outbox) and changed states in the open transaction."""
    now = _now() if now_ms is None else now_ms
    current: dict[tuple[str, str], int | None] = {}
    opened = cleared = queued = refused = 0
    for t in ev.transitions:
        key = (t.rule, t.device_id)
        rule = rules.get(t.rule)
        if t.kind == "open":
            alert = _open(tx, t, rule, now)
            if alert is None:
                refused += 1
                rows = tx.execute("SELECT id FROM alerts WHERE rule = ? AND device_id = ? AND state <> 'cleared'",
                                  (t.rule, t.device_id))
                current[key] = int(rows[0][0]) if rows else None
                continue
            aid = current[key] = alert["id"]
            opened += 1
            _history(tx, aid, "open", now, actor, None, t.value)
            queued += _enqueue(tx, alert, "open", _notify_targets(rule), now, actor, None)
        else:
            aid = current.get(key, t.alert_id)
            if aid is None:
                continue
            rows = tx.execute("UPDATE alerts SET state = 'cleared', cleared_ts_ms = ?, cleared_ms = ?, cleared_by = ?,"
                              f" clear_value = ? WHERE id = ? AND state <> 'cleared' RETURNING {_ALERT_COLS}",
                              (t.ts_ms, now, actor, t.value, aid))
            if not rows:  # cleared by hand already: nothing to announce
                continue
            cleared += 1
            _history(tx, aid, "clear", now, actor, None, t.value)
            queued += _enqueue(tx, _alert_dict(rows[0]), "clear", _notify_targets(rule), now, actor, None)
    upsert, delete = [], []
    for (rule_name, dev), st in ev.states.items():
        aid = current.get((rule_name, dev), st.alert_id)
        if st.idle:
            delete.append((rule_name, dev))
        else:
            upsert.append((rule_name, dev, int(st.firing), st.since_ms, aid, _aux_json(st.aux)))
    if delete:
        tx.executemany("DELETE FROM alert_state WHERE rule = ? AND device_id = ?", delete)
    if upsert:
        tx.executemany("INSERT INTO alert_state (rule, device_id, firing, since_ms, alert_id, aux)"
                       " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule, device_id) DO UPDATE SET"
                       " firing = excluded.firing, since_ms = excluded.since_ms, alert_id = excluded.alert_id,"
                       " aux = excluded.aux", upsert)
    return Applied(opened, cleared, queued, refused)


def _open(tx: SqlTxn, t: Transition, rule: Rule | None, now: int) -> dict[str, Any] | None:
    """The alert opened (its row as inserted), or None: one was active already."""
    severity = rule.severity if rule is not None else "warning"
    labels = json.dumps(dict(rule.labels) if rule is not None else {}, sort_keys=True)
    rows = tx.execute(
        "INSERT INTO alerts (rule, device_id, severity, labels, state, value, opened_ts_ms, opened_ms)"
        " VALUES (?, ?, ?, ?, 'open', ?, ?, ?)"
        f" ON CONFLICT (rule, device_id) WHERE state <> 'cleared' DO NOTHING RETURNING {_ALERT_COLS}",
        (t.rule, t.device_id, severity, labels, t.value, t.ts_ms, now))
    return _alert_dict(rows[0]) if rows else None


def absence_candidates(tx: SqlTxn) -> list[AbsenceCandidate]:
    """Devices absence rules watch: every device seen (last received, wall clock) and every active
    registered device never seen (since its registration). Retired and suspended devices are left out."""
    seen = {d: int(ms) for d, ms in tx.execute("SELECT device_id, last_seen_ms FROM devices")}
    out = [AbsenceCandidate(d, ms) for d, ms in seen.items()]
    for dev, status, created in tx.execute("SELECT id, status, created_ms FROM device_registry"):
        if dev in seen:
            if status != "active":
                out = [c for c in out if c.device_id != dev]
            continue
        if status == "active":
            out.append(AbsenceCandidate(dev, int(created), registered_only=True))
    return out


# -- outbox --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Notification:
    """One outbox row to deliver. ``id`` is the stable notification id receivers de-duplicate on."""

    id: int
    alert_id: int
    event: str
    target: dict[str, Any]
    payload: dict[str, Any]
    created_ms: int
    attempts: int

    @property
    def notification_id(self) -> str:
        """The id sent with every try of this notification (``fm-<outbox id>``)."""
        return f"fm-{self.id}"


def next_notifications(tx: SqlTxn, *, now_ms: int, limit: int = 100, lease_ms: int = 60_000) -> list[Notification]:
    """Claim pending notifications due at ``now_ms`` (oldest first) for ``lease_ms``: another notifier (a
    replica) skips them meanwhile; if this one dies before marking them, they are due again after it."""
    # A notification waits while an earlier one of its alert to the same target is pending: receivers see
    # an alert's steps in order.
    rows = tx.execute("UPDATE alert_outbox SET next_ms = ? WHERE id IN (SELECT o.id FROM alert_outbox o"
                      " WHERE o.status = 'pending' AND o.next_ms <= ? AND NOT EXISTS (SELECT 1 FROM alert_outbox e"
                      " WHERE e.alert_id = o.alert_id AND e.target = o.target AND e.status = 'pending'"
                      " AND e.id < o.id) ORDER BY o.id LIMIT ?)"
                      " AND status = 'pending' AND next_ms <= ?"
                      " RETURNING id, alert_id, event, target, payload, created_ms, attempts",
                      (now_ms + lease_ms, now_ms, limit, now_ms))
    out = [Notification(int(r[0]), int(r[1]), r[2], json.loads(r[3]), json.loads(r[4]), int(r[5]), int(r[6]))
           for r in rows]
    out.sort(key=lambda n: n.id)
    return out


def mark_delivered(tx: SqlTxn, ids: Sequence[int], *, now_ms: int) -> None:
    """The receivers acknowledged these notifications: never sent again."""
    mark_delivered_at(tx, [(i, now_ms) for i in ids])


def mark_delivered_at(tx: SqlTxn, acked: Sequence[tuple[int, int]]) -> None:
    """The receivers acknowledged these notifications, as (outbox id, when): never sent again."""
    tx.executemany("UPDATE alert_outbox SET status = 'delivered', delivered_ms = ?, attempts = attempts + 1"
                   " WHERE id = ? AND status = 'pending'", [(at, i) for i, at in acked])


def mark_failed(tx: SqlTxn, failures: Sequence[tuple[Notification, str, int]], *, now_ms: int) -> list[bool]:
    """Tries that failed, as (notification, error, retry_in_ms): each is due again after its delay, or kept as
    ``failed`` after :data:`MAX_ATTEMPTS` tries. Per failure: True when it failed for good."""
    finals = [n.attempts + 1 >= MAX_ATTEMPTS for n, _, _ in failures]
    tx.executemany("UPDATE alert_outbox SET attempts = ?, next_ms = ?, last_error = ?, status = ? WHERE id = ?",
                   [(n.attempts + 1, now_ms + delay, err[:500], "failed" if final else "pending", n.id)
                    for (n, err, delay), final in zip(failures, finals, strict=True)])
    return finals


# -- the API's side ------------------------------------------------------------------------------
class _Con:
    """:class:`SqlTxn` over a :class:`HotTables` connection inside its ``_tx``."""

    def __init__(self, con: Any, pg: bool) -> None:
        self._con = con
        self.dialect = "postgresql" if pg else "sqlite"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        q = sql.replace("?", "%s") if self.dialect == "postgresql" else sql
        cur = self._con.execute(q, params)
        return list(cur.fetchall()) if cur.description is not None else []

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        q = sql.replace("?", "%s") if self.dialect == "postgresql" else sql
        if self.dialect == "postgresql":
            with self._con.cursor() as cur:
                cur.executemany(q, list(rows))
        else:
            self._con.executemany(q, rows)


class AlertTables(HotTables):
    """Rules, alerts and the outbox, for the API and the CLI (each change audited in its transaction)."""

    SQLITE_DDL = SQLITE_DDL + _REGISTRY_SQLITE_DDL
    PG_DDL = PG_DDL + _REGISTRY_PG_DDL
    APP_NAME = "fieldmesh-alerts"
    WHAT = "alerts"

    def _q(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._fetch(sql, params)

    def transact(self, fn: Callable[[SqlTxn], T]) -> T:
        """Run ``fn`` in one write transaction of these tables (the SLO alerts of :mod:`fieldmesh.obs.slo`
        go through :func:`apply_evaluation` like the processor's)."""
        with self._tx() as con:
            return fn(_Con(con, self._pg))

    # -- rules ---------------------------------------------------------------------------------
    def rules(self) -> list[dict[str, Any]]:
        """Every rule with where it came from and when it changed, by name."""
        rows = self._q("SELECT name, body, source, updated_ms, updated_by FROM alert_rules ORDER BY name")
        return [{**json.loads(r[1]), "source": r[2], "updated_ms": int(r[3]), "updated_by": r[4]} for r in rows]

    def rule(self, name: str) -> dict[str, Any]:
        """One rule; NotFoundError when there is none."""
        found = [r for r in self._q("SELECT name, body, source, updated_ms, updated_by FROM alert_rules WHERE name = ?",
                                    (name,))]
        if not found:
            raise NotFoundError(f"no alert rule {name!r}", kind="rule", key=name)
        r = found[0]
        return {**json.loads(r[1]), "source": r[2], "updated_ms": int(r[3]), "updated_by": r[4]}

    def version(self) -> int:
        """The rules' version counter."""
        rows = self._q("SELECT version FROM alert_rules_version WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    def put_rule(self, rule: Rule, *, actor: str, create: bool | None = None, source: str = "api") -> dict[str, Any]:
        """Store ``rule``: ``create`` True refuses an existing name (ConflictError), False a missing one
        (NotFoundError), None takes either."""
        now = _now()
        body = json.dumps(rule.as_dict(), sort_keys=True)
        with self._tx() as con:
            tx = _Con(con, self._pg)
            exists = bool(tx.execute("SELECT 1 FROM alert_rules WHERE name = ?", (rule.name,)))
            if create is True and exists:
                raise ConflictError(f"alert rule {rule.name!r} exists: PUT /rules/{rule.name} changes it",
                                    kind="rule", key=rule.name)
            if create is False and not exists:
                raise NotFoundError(f"no alert rule {rule.name!r}", kind="rule", key=rule.name)
            tx.execute("INSERT INTO alert_rules (name, body, source, updated_ms, updated_by) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT (name) DO UPDATE SET body = excluded.body, source = excluded.source,"
                       " updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                       (rule.name, body, source, now, actor))
            _bump(tx)
            self._audit(con, actor, "rule.update" if exists else "rule.add", rule.name, rule.as_dict())
        return {**rule.as_dict(), "source": source, "updated_ms": now, "updated_by": actor}

    def delete_rule(self, name: str, *, actor: str) -> None:
        """Remove a rule; its active alerts stay for operators to clear (and its state goes)."""
        with self._tx() as con:
            tx = _Con(con, self._pg)
            if not tx.execute("DELETE FROM alert_rules WHERE name = ? RETURNING name", (name,)):
                raise NotFoundError(f"no alert rule {name!r}", kind="rule", key=name)
            tx.execute("DELETE FROM alert_state WHERE rule = ?", (name,))
            _bump(tx)
            self._audit(con, actor, "rule.delete", name, {})

    def sync_file(self, rules: Sequence[Rule], *, source: str, actor: str) -> dict[str, int]:
        """Make the rules from ``source`` (``file:<path>``) exactly ``rules``: add, change, remove those from
        the same file; a rule of that name from the API is replaced. Nothing changes (no version bump) when
        the file says what is stored."""
        now = _now()
        with self._tx() as con:
            tx = _Con(con, self._pg)
            stored = {n: (b, s) for n, b, s in tx.execute("SELECT name, body, source FROM alert_rules")}
            counts = {"added": 0, "updated": 0, "removed": 0}
            for rule in rules:
                body = json.dumps(rule.as_dict(), sort_keys=True)
                if stored.get(rule.name) == (body, source):
                    continue
                counts["updated" if rule.name in stored else "added"] += 1
                tx.execute("INSERT INTO alert_rules (name, body, source, updated_ms, updated_by) VALUES (?, ?, ?, ?, ?)"
                           " ON CONFLICT (name) DO UPDATE SET body = excluded.body, source = excluded.source,"
                           " updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                           (rule.name, body, source, now, actor))
            names = {r.name for r in rules}
            for name, (_, src) in stored.items():
                if src == source and name not in names:
                    counts["removed"] += 1
                    tx.execute("DELETE FROM alert_rules WHERE name = ?", (name,))
                    tx.execute("DELETE FROM alert_state WHERE rule = ?", (name,))
            if any(counts.values()):
                _bump(tx)
                self._audit(con, actor, "rule.sync", source, counts)
        return counts

    # -- alerts --------------------------------------------------------------------------------
    def alerts(self, *, state: str | None = None, device_id: str | None = None, rule: str | None = None,
               severity: str | None = None, since_ms: int | None = None, devices: Sequence[str] | None = None,
               limit: int = 1000) -> list[dict[str, Any]]:
        """Alerts, newest first; ``devices`` (when given) limits them to those device ids."""
        where: list[str] = []
        params: list[Any] = []
        for col, v in (("state", state), ("device_id", device_id), ("rule", rule), ("severity", severity)):
            if v is not None:
                where.append(f"{col} = ?")
                params.append(v)
        if since_ms is not None:
            where.append("opened_ms >= ?")
            params.append(since_ms)
        if devices is not None:
            if not devices:
                return []
            if self._pg:
                where.append("device_id = ANY(?)")
                params.append(list(devices))
            else:
                where.append("device_id IN (SELECT value FROM json_each(?))")
                params.append(json.dumps(list(devices)))
        sql = f"SELECT {_ALERT_COLS} FROM alerts" + (" WHERE " + " AND ".join(where) if where else "")
        return [_alert_dict(r) for r in self._q(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))]

    def alert(self, alert_id: int) -> dict[str, Any]:
        """One alert with its history and notifications; NotFoundError when there is none."""
        rows = self._q(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,))
        if not rows:
            raise NotFoundError(f"no alert {alert_id}", kind="alert", key=str(alert_id))
        out = _alert_dict(rows[0])
        out["history"] = [{"at_ms": int(h[0]), "event": h[1], "actor": h[2], "note": h[3], "value": h[4]}
                          for h in self._q("SELECT at_ms, event, actor, note, value FROM alert_history"
                                           " WHERE alert_id = ? ORDER BY id", (alert_id,))]
        out["notifications"] = [_outbox_dict(n) for n in self._q(
            f"SELECT {_OUTBOX_COLS} FROM alert_outbox WHERE alert_id = ? ORDER BY id", (alert_id,))]
        return out

    def _step(self, alert_id: int, event: str, *, actor: str, note: str | None) -> dict[str, Any]:
        now = _now()
        with self._tx() as con:
            tx = _Con(con, self._pg)
            alert = _get(tx, alert_id)
            if alert is None:
                raise NotFoundError(f"no alert {alert_id}", kind="alert", key=str(alert_id))
            if alert["state"] == "cleared" or (event == "ack" and alert["state"] == "acknowledged"):
                raise ConflictError(f"alert {alert_id} is {alert['state']} already", kind="alert", key=str(alert_id))
            if event == "ack":
                tx.execute("UPDATE alerts SET state = 'acknowledged', acked_ms = ?, acked_by = ?, note = ?"
                           " WHERE id = ?", (now, actor, note, alert_id))
            else:
                tx.execute("UPDATE alerts SET state = 'cleared', cleared_ms = ?, cleared_by = ?,"
                           " note = COALESCE(?, note) WHERE id = ?", (now, actor, note, alert_id))
            _history(tx, alert_id, event, now, actor, note, None)
            rules = {r.name: r for r in load_rules(tx)[1]}
            fresh = _get(tx, alert_id)
            assert fresh is not None
            _enqueue(tx, fresh, event, _notify_targets(rules.get(alert["rule"])), now, actor, note)
            self._audit(con, actor, f"alert.{event}", str(alert_id), {"note": note, "rule": alert["rule"],
                                                                       "device_id": alert["device_id"]})
        return self.alert(alert_id)

    def ack(self, alert_id: int, *, actor: str, note: str | None = None) -> dict[str, Any]:
        """Acknowledge an open alert (ConflictError when acknowledged or cleared already)."""
        return self._step(alert_id, "ack", actor=actor, note=note)

    def clear(self, alert_id: int, *, actor: str, note: str | None = None) -> dict[str, Any]:
        """Clear an alert by hand (ConflictError when cleared already). It opens again only after the
        condition has cleared and returned."""
        return self._step(alert_id, "clear", actor=actor, note=note)

    # -- notifications and stats ---------------------------------------------------------------
    def notifications(self, *, status: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Outbox rows, newest first (``status``: pending, delivered, failed)."""
        where = " WHERE status = ?" if status else ""
        sql = f"SELECT {_OUTBOX_COLS} FROM alert_outbox{where} ORDER BY id DESC LIMIT ?"
        return [_outbox_dict(r) for r in self._q(sql, (*([status] if status else []), limit))]

    def stats(self) -> dict[str, Any]:
        """Active alerts by severity, notifications by status."""
        active = {s: int(n) for s, n in self._q("SELECT severity, COUNT(*) FROM alerts WHERE state <> 'cleared'"
                                                " GROUP BY severity")}
        outbox = {s: int(n) for s, n in self._q("SELECT status, COUNT(*) FROM alert_outbox GROUP BY status")}
        retries = self._q("SELECT COALESCE(SUM(CASE WHEN status = 'delivered' THEN attempts - 1 ELSE attempts END),"
                          " 0) FROM alert_outbox")
        lat = sorted(int(r[0]) for r in self._q(
            "SELECT delivered_ms - created_ms FROM alert_outbox WHERE status = 'delivered'"
            " ORDER BY id DESC LIMIT 1000"))

        def q(p: float) -> int | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

        return {"active_by_severity": active, "active": sum(active.values()),
                "notifications": {k: outbox.get(k, 0) for k in ("pending", "delivered", "failed")},
                "failed_tries": int(retries[0][0]),
                "latency_ms": {"p50": q(0.5), "p99": q(0.99), "of_last": len(lat)},
                "rules": int(self._q("SELECT COUNT(*) FROM alert_rules")[0][0]), "rules_version": self.version(),
                "rules_file_refused": int(self._q("SELECT COUNT(*) FROM audit_log"
                                                  " WHERE action = 'rule.file_refused'")[0][0])}


_OUTBOX_COLS: Final = "id, alert_id, event, target, created_ms, status, attempts, next_ms, delivered_ms, last_error"


def _outbox_dict(r: Sequence[Any]) -> dict[str, Any]:
    return {"id": int(r[0]), "notification_id": f"fm-{int(r[0])}", "alert_id": int(r[1]), "event": r[2],
            "target": json.loads(r[3]), "created_ms": int(r[4]), "status": r[5], "attempts": int(r[6]),
            "next_ms": int(r[7]), "delivered_ms": r[8], "last_error": r[9]}
