"""The processor's alert stage: rules evaluated inside the batch's transaction, absence on a wall-clock tick.

:class:`AlertEngine` joins :mod:`fieldmesh.stream.alerts` (what the rules decide) with
:mod:`fieldmesh.store.alerts` (where state, alerts and notifications are kept). Per batch, inside the hot
store's transaction (:meth:`in_txn`): the rules' version is read (a changed version reloads them, in
that transaction, so a rule change applies from the first batch committed after it), the states of the
batch's devices are read, the batch's new readings are evaluated and transitions, states and outbox rows
written. Nothing is kept in memory between batches but the rules, so a crash, a replica taking a
partition over, or an operator's clear in the API never leaves a stale state here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from fieldmesh.core.batch import BatchResult
from fieldmesh.store.alerts import (
    Applied,
    Notification,
    absence_candidates,
    apply_evaluation,
    ensure_tables,
    load_rules,
    load_states,
    mark_delivered_at,
    next_notifications,
    rules_version,
)
from fieldmesh.store.base import HotStore, SqlTxn
from fieldmesh.stream.alerts import Rule, evaluate, evaluate_absence

__all__ = ["AlertEngine", "AlertStats"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AlertStats:
    """In-process counters of one processor's alert stage."""

    opened: int = 0
    cleared: int = 0
    refused: int = 0  # opens the one-active-alert index refused (an alert was active already)
    queued: int = 0  # notifications written to the outbox
    rules: int = 0
    rules_version: int = -1


class AlertEngine:
    """Evaluates alert rules for a :class:`~fieldmesh.stream.processor.Processor` (see the module docstring)."""

    def __init__(self, store: HotStore) -> None:
        self.store = store
        store.transact(ensure_tables)
        self._version = -1
        self._rules: list[Rule] = []
        self._by_name: dict[str, Rule] = {}
        self.stats = AlertStats()
        self.notify = threading.Event()  # set when a commit queued notifications (wakes the notifier)
        #: Takes the notifications a batch claimed in its own transaction, after the commit (the notifier's
        #: :meth:`~fieldmesh.stream.notifier.Notifier.hand`): sent at once, without a claim of their own.
        self.hand: Callable[[Sequence[Notification]], None] | None = None
        self._lock = threading.Lock()
        # Notifications the notifier's receivers acknowledged, marked delivered in the next transaction
        # here (a batch or a tick): (outbox id, when), and how many of them that transaction took.
        self._acked: list[tuple[int, int]] = []
        self._acked_lock = threading.Lock()
        self._taking = 0

    def acked(self, ids: Sequence[int], at_ms: int) -> None:
        """The notifier's receivers acknowledged ``ids``: marked delivered with the next batch (or tick)."""
        with self._acked_lock:
            self._acked.extend((i, at_ms) for i in ids)

    def _flush_acked(self, tx: SqlTxn) -> int:
        with self._acked_lock:
            todo = list(self._acked)
        if todo:
            mark_delivered_at(tx, todo)
        self._taking = len(todo)
        return len(todo)

    def _drop_flushed(self) -> None:
        with self._acked_lock:
            del self._acked[:self._taking]
        self._taking = 0

    @property
    def rules(self) -> list[Rule]:
        """The rules in force (as of the last transaction that read them)."""
        return list(self._rules)

    def _refresh(self, tx: SqlTxn) -> None:
        if rules_version(tx) != self._version:
            version, rules = load_rules(tx)
            with self._lock:
                self._version, self._rules = version, rules
                self._by_name = {r.name: r for r in rules}
            self.stats.rules, self.stats.rules_version = len(rules), version
            log.info("alert rules: %d (version %d)", len(rules), version)

    def in_txn(self, tx: SqlTxn, result: BatchResult, device_wm: Mapping[str, int]) -> Applied:
        """Evaluate ``result.new`` and write the outcome in the batch's open transaction ``tx``.

        ``device_wm``: each device's latest event time before the batch. Counters are not touched here
        (the transaction may be rerun or rolled back): pass the return value to :meth:`committed`.
        """
        self._refresh(tx)
        marked = self._flush_acked(tx)
        new = result.new
        applied = Applied()
        if self._rules and len(new):
            states = load_states(tx, new.devices)
            ev = evaluate(self._rules, new, device_wm, states)
            if ev.transitions or ev.states:
                applied = apply_evaluation(tx, ev, self._by_name)
        # claimed with the batch, sent right after it: what it queued, and steps the marks just freed
        if (applied.notifications or marked) and self.hand is not None:
            now = int(time.time() * 1000)
            applied = replace(applied, claimed=tuple(next_notifications(tx, now_ms=now, limit=1000)))
        return applied

    def committed(self, applied: Applied) -> None:
        """The transaction of ``applied`` committed: count it, wake the notifier."""
        st = self.stats
        st.opened += applied.opened
        st.cleared += applied.cleared
        st.refused += applied.refused
        st.queued += applied.notifications
        self._drop_flushed()
        if applied.claimed and self.hand is not None:
            self.hand(applied.claimed)
        elif applied.notifications:
            self.notify.set()

    def tick(self, now_ms: int | None = None) -> Applied:
        """Reload changed rules and open absence alerts due at wall-clock ``now_ms``, in a transaction of its own."""
        now = int(time.time() * 1000) if now_ms is None else now_ms

        def run(tx: SqlTxn) -> Applied:
            self._refresh(tx)
            self._flush_acked(tx)
            absent = [r for r in self._rules if r.kind == "absence" and r.enabled]
            if not absent:
                return Applied()
            cands = absence_candidates(tx)
            states = load_states(tx, [c.device_id for c in cands])
            ev = evaluate_absence(absent, cands, states, now)
            if not ev.transitions:
                return Applied()
            return apply_evaluation(tx, ev, self._by_name, now_ms=now)

        applied = self.store.transact(run)
        self.committed(applied)
        return applied
