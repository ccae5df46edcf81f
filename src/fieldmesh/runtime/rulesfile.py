"""The alert rules file (``--rules FILE``): loaded into the hot store at start, and again whenever it changes.

At start a bad file stops the processor (:class:`~fieldmesh.core.errors.ConfigError`, exit code 2). While
it runs, :class:`RulesFile` looks at the file's modification time and size every ``interval_s``; a changed
file is read and checked once it stayed the same for one look (an editor's write is not read half-way),
and its rules replace those it loaded before (:meth:`~fieldmesh.store.alerts.AlertTables.sync_file`: one
transaction that bumps the rules' version, so every processor takes the change from its next batch).
A changed file that is unreadable or holds a bad rule is refused: the rules in force stay, the error is
logged once per version of the file (naming the file, the rule and the field) and recorded in the audit
log as ``rule.file_refused``, which ``/api/v1/stats`` (``alerts.rules_file_refused``) and ``/metrics``
(``fieldmesh_alert_rules_file_refused_total``) count.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from fieldmesh.core.errors import ConfigError
from fieldmesh.store.alerts import AlertTables
from fieldmesh.stream.alerts import Rule, RuleError, rules_from_yaml

__all__ = ["RulesFile"]

log = logging.getLogger(__name__)


class RulesFile:
    """One rules file synchronised into the hot store at ``store_url`` (see the module docstring)."""

    def __init__(self, path: Path, store_url: str, *, interval_s: float = 2.0) -> None:
        self.path = path.resolve()
        self.store_url = store_url
        self.interval_s = interval_s
        self.source = f"file:{self.path}"
        self.loads = 0  # versions of the file loaded (the first at start included)
        self.refused = 0  # versions of the file refused while running
        self.last_error: str | None = None
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the version last looked at
        self._settling: tuple[int, int] | None = None  # of a changed version seen once, read at the next look
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def load(self) -> dict[str, int]:
        """Load the file at start: the counts of rules added, updated and removed.

        Raises:
            ConfigError: the file is unreadable or holds a bad rule (the start stops).
        """
        self._seen = self._stamp()
        try:
            rules = rules_from_yaml(self.path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the rules file {self.path}: {exc}", key="alerts.rules_file") from exc
        except RuleError as exc:
            raise ConfigError(f"{self.path}: {exc}", key="alerts.rules_file") from exc
        counts = self._sync(rules)
        log.info("alert rules from %s: %d rules (%s)", self.path, len(rules), counts)
        return counts

    def _sync(self, rules: Sequence[Rule]) -> dict[str, int]:
        tables = AlertTables(self.store_url)
        try:
            counts = tables.sync_file(rules, source=self.source, actor="file")
        finally:
            tables.close()
        self.loads += 1
        self.last_error = None
        return counts

    def check(self) -> str:
        """Look at the file once: ``unchanged``, ``settling`` (changed since the last look: it is read once it
        stays the same for a look, so a file being written is not read half-way), ``loaded`` (a new version
        synchronised) or ``refused``."""
        stamp = self._stamp()
        if stamp == self._seen:
            self._settling = None
            return "unchanged"
        if stamp != self._settling:
            self._settling = stamp
            return "settling"
        self._settling = None
        try:
            if stamp is None:
                raise OSError("the file is gone")
            rules = rules_from_yaml(self.path.read_text())
        except (OSError, RuleError) as exc:
            self._seen = stamp  # this version is refused once; the next edit is looked at again
            self._refuse(str(exc))
            return "refused"
        counts = self._sync(rules)
        self._seen = stamp
        log.info("alert rules file %s changed: %d rules (%s)", self.path, len(rules), counts)
        return "loaded"

    def _refuse(self, error: str) -> None:
        self.refused += 1
        self.last_error = error
        log.error("alert rules file %s refused, the rules in force stay: %s", self.path, error)
        tables = AlertTables(self.store_url)
        try:
            tables.record(actor="file", action="rule.file_refused", target=self.source, detail={"error": error})
        finally:
            tables.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # the store is unavailable: the same version is looked at again
                self._seen = None
                log.warning("alert rules file %s: %s; trying again", self.path, exc)

    def start(self) -> None:
        """Watch the file in a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="fm-rules-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
