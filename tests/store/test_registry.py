"""The device registry (store/registry.py) on real SQLite files and real PostgreSQL schemas.

Each test gets a store of its own (``store_url`` of tests/store/conftest.py: a new SQLite file, or a
new schema in the local PostgreSQL). The concurrency tests run real writers on their own connections.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fieldmesh.core.errors import BackendError, ConfigError, ConflictError, NotFoundError, RowsRejected
from fieldmesh.store.access import AccessStore
from fieldmesh.store.registry import Certificate, DeviceRegistry, parse_csv

DAY_MS = 86_400_000
T0 = int(time.time() * 1000) - 2 * DAY_MS  # certificates valid from two days ago


@pytest.fixture
def reg(store_url: str) -> Iterator[DeviceRegistry]:
    r = DeviceRegistry(store_url)
    yield r
    r.close()


def cert(serial: str, device_id: str, *, not_before_days: int = 0, not_after_days: int = 10) -> Certificate:
    """A certificate row valid from ``T0`` + ``not_before_days`` to ``T0`` + ``not_after_days``."""
    fp = (serial * 64)[:64]
    return Certificate(serial=serial, device_id=device_id, subject=f"CN={device_id},O=fieldmesh", fingerprint=fp,
                       not_before_ms=T0 + not_before_days * DAY_MS, not_after_ms=T0 + not_after_days * DAY_MS,
                       revoked_ms=None,
                       pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")


def actions(reg: DeviceRegistry) -> list[tuple[str, str, str]]:
    """The audit log, oldest first, as (actor, action, target)."""
    return [(e.actor, e.action, e.target) for e in reversed(reg.audit_log(limit=1000))]


def test_add_get_update_delete_with_audit(reg: DeviceRegistry, store_url: str) -> None:
    v0 = reg.version()
    dev = reg.add("p1-a", groups=["plant1", "lab", "plant1"], tags=["fw:1.2"], attributes={"site": "north", "n": 3},
                  actor="cli:ops")
    assert (dev.id, dev.status, dev.groups, dev.tags, dev.attributes) == (
        "p1-a", "active", ("lab", "plant1"), ("fw:1.2",), {"n": 3, "site": "north"})
    assert reg.get("p1-a") == dev and reg.get("nope") is None
    v1 = reg.version()
    assert v1 > v0
    up = reg.update("p1-a", groups=["plant2"], attributes_patch={"n": None, "floor": 2}, status="suspended",
                    actor="key:abc")
    assert (up.groups, up.status, up.attributes, up.created_ms) == (
        ("plant2",), "suspended", {"floor": 2, "site": "north"}, dev.created_ms)
    assert up.updated_ms >= dev.updated_ms and reg.get("p1-a") == up
    v2 = reg.version()
    assert v2 > v1
    assert reg.update("p1-a", status="suspended", actor="key:abc") == up  # nothing changes: no write
    assert reg.version() == v2
    assert reg.update("p1-a", attributes={"only": True}, actor="key:abc").attributes == {"only": True}
    reg.delete("p1-a", actor="jwt:alice")
    assert reg.get("p1-a") is None and reg.list() == []
    assert reg.version() > v2
    assert actions(reg) == [("cli:ops", "device.add", "p1-a"), ("key:abc", "device.update", "p1-a"),
                            ("key:abc", "device.update", "p1-a"), ("jwt:alice", "device.delete", "p1-a")]
    entries = reg.audit_log()
    assert entries[-2].detail["status"] == {"from": "active", "to": "suspended"}
    assert entries[0].detail["was"]["groups"] == ["plant2"]
    keys = AccessStore(store_url)  # the same audit log the API keys write
    try:
        assert keys.audit_log()[0].action == "device.delete"
    finally:
        keys.close()


def test_errors(reg: DeviceRegistry) -> None:
    reg.add("d1", actor="t")
    with pytest.raises(ConflictError) as conflict:
        reg.add("d1", actor="t")
    assert (conflict.value.kind, conflict.value.key) == ("device", "d1")
    with pytest.raises(NotFoundError):
        reg.update("d2", status="retired", actor="t")
    with pytest.raises(NotFoundError):
        reg.delete("d2", actor="t")
    for kwargs, key in [({"status": "gone"}, "status"), ({"groups": ["bad group"]}, "groups"),
                        ({"tags": ["x" * 65]}, "tags"), ({"attributes": {"bad key": 1}}, "attributes"),
                        ({"attributes": {"big": "x" * 20_000}}, "attributes"),
                        ({"attributes": {"nan": float("nan")}}, "attributes"), ({"groups": "plant1"}, "groups")]:
        with pytest.raises(ConfigError) as bad:
            reg.add("d3", actor="t", **kwargs)
        assert bad.value.key == key, kwargs
    with pytest.raises(ConfigError):
        reg.add("bad/id", actor="t")
    with pytest.raises(ConfigError):
        reg.update("d1", status="gone", actor="t")
    assert [d.id for d in reg.list()] == ["d1"]  # nothing half-written
    assert actions(reg) == [("t", "device.add", "d1")]


def test_list_filters_and_pages(reg: DeviceRegistry) -> None:
    for i in range(7):
        reg.add(f"dev-{i}", groups=["even" if i % 2 == 0 else "odd", "all"],
                status="retired" if i == 3 else "active", actor="t")
    assert [d.id for d in reg.list(group="even")] == ["dev-0", "dev-2", "dev-4", "dev-6"]
    assert [d.id for d in reg.list(status="retired")] == ["dev-3"]
    assert [d.id for d in reg.list(status="active", group="odd")] == ["dev-1", "dev-5"]
    assert reg.list(group="none") == []
    page1 = reg.list(group="all", limit=3)
    page2 = reg.list(group="all", after=page1[-1].id, limit=3)
    page3 = reg.list(group="all", after=page2[-1].id, limit=3)
    assert [d.id for d in page1 + page2 + page3] == [f"dev-{i}" for i in range(7)]
    reg.update("dev-0", groups=["odd"], actor="t")
    assert [d.id for d in reg.list(group="even")] == ["dev-2", "dev-4", "dev-6"]
    assert reg.group_map()["dev-0"] == ("odd",)
    v, groups = reg.snapshot()
    assert v == reg.version() and groups == reg.group_map() and len(groups) == 7


def test_certificates(reg: DeviceRegistry) -> None:
    reg.add("d1", actor="t")
    reg.add("d2", actor="t")
    with pytest.raises(NotFoundError):
        reg.add_certificate(cert("0a", "ghost"), actor="ca")
    reg.add_certificate(cert("0a", "d1"), actor="ca")
    reg.add_certificate(cert("0b", "d1", not_before_days=1), actor="ca")
    reg.add_certificate(cert("1c", "d2"), actor="ca")
    with pytest.raises(ConflictError):
        reg.add_certificate(cert("0a", "d2"), actor="ca")
    with pytest.raises(ConfigError):
        reg.add_certificate(Certificate(**{**cert("0d", "d1").__dict__, "serial": "0D"}), actor="ca")
    assert [c.serial for c in reg.certificates()] == ["0a", "0b", "1c"]
    assert [c.serial for c in reg.certificates("d1")] == ["0a", "0b"]
    assert [c.serial for c in reg.certificates("d1", valid_at_ms=T0)] == ["0a"]
    assert [c.serial for c in reg.certificates("d1", valid_at_ms=T0 + DAY_MS)] == ["0a", "0b"]
    assert [c.serial for c in reg.certificates(valid_at_ms=T0 + 11 * DAY_MS)] == []
    v = reg.version()
    revoked = reg.revoke_certificate("0a", actor="key:adm", reason="lost")
    assert revoked.revoked_ms is not None and reg.version() > v
    assert reg.revoke_certificate("0a", actor="key:adm") == revoked  # again: nothing changes
    now = int(time.time() * 1000) + 1
    assert [c.serial for c in reg.certificates("d1", valid_at_ms=now)] == ["0b"]
    assert [c.serial for c in reg.certificates("d1", valid_at_ms=T0 + DAY_MS)] == ["0a", "0b"]  # before the revocation
    assert not revoked.valid_at(revoked.revoked_ms + 1) and revoked.valid_at(revoked.revoked_ms - 1)
    with pytest.raises(NotFoundError):
        reg.revoke_certificate("ff", actor="t")
    reg.delete("d1", actor="t")  # its certificates are kept, revoked
    assert all(c.revoked_ms is not None for c in reg.certificates("d1"))
    assert reg.audit_log()[0].detail["certificates_revoked"] == ["0b"]
    assert [c.serial for c in reg.certificates(valid_at_ms=int(time.time() * 1000) + 1)] == ["1c"]
    assert [a for _, a, _ in actions(reg)].count("cert.revoke") == 1
    # what a CRL names: the revoked ones not expired yet (T0 + 10 days)
    assert [r[0] for r in reg.revoked(at_ms=T0)] == ["0a", "0b"]
    assert dict(reg.revoked(at_ms=T0))["0a"] == revoked.revoked_ms
    assert reg.revoked(at_ms=T0 + 10 * DAY_MS) == []


def test_import_csv(reg: DeviceRegistry) -> None:
    reg.add("old-1", groups=["g1"], tags=["t"], attributes={"keep": "k", "drop": "d"}, actor="t")
    reg.add("old-2", groups=["g1"], actor="t")
    text = ("device_id,groups,tags,status,attr.drop,attr.site\n"
            "new-1,g1;g2,a;b,,,north\n"
            "\n"
            'new-2,"g2",,suspended,,"south, east"\n'
            "old-1,g3,,retired,,west\n"
            "old-2,g1,,,,\n")
    v = reg.version()
    assert reg.import_csv(text, actor="cli:ops") == {"added": 2, "updated": 1, "unchanged": 1}
    assert reg.version() > v
    n1, n2, o1 = reg.get("new-1"), reg.get("new-2"), reg.get("old-1")
    assert n1 is not None and (n1.groups, n1.tags, n1.status, n1.attributes) == (
        ("g1", "g2"), ("a", "b"), "active", {"site": "north"})
    assert n2 is not None and (n2.status, n2.attributes) == ("suspended", {"site": "south, east"})
    assert o1 is not None and (o1.groups, o1.tags, o1.status, o1.attributes) == (
        ("g3",), (), "retired", {"keep": "k", "site": "west"})
    assert actions(reg)[-1] == ("cli:ops", "device.import", "3 devices")
    assert reg.audit_log()[0].detail["devices"] == ["new-1", "new-2", "old-1"]
    v = reg.version()
    assert reg.import_csv("device_id\nold-2\n", actor="t") == {"added": 0, "updated": 0, "unchanged": 1}
    assert reg.version() == v  # nothing changed: no write


def test_import_is_all_or_nothing_and_names_every_bad_line(reg: DeviceRegistry) -> None:
    text = ("device_id,groups,status,attr.x\n"
            "ok-1,g1,,1\n"
            "bad/id,g1,,\n"
            "ok-2,bad group,,\n"
            "ok-3,g1,sleeping,\n"
            "ok-1,g1,,\n"
            "ok-4,g1\n"
            "ok-5,g1,,2\n")
    with pytest.raises(RowsRejected) as rejected:
        reg.import_csv(text, actor="t")
    assert [n for n, _ in rejected.value.errors] == [3, 4, 5, 6, 7]
    msgs = dict(rejected.value.errors)
    assert "bad device id 'bad/id'" in msgs[3] and "bad group name 'bad group'" in msgs[4]
    assert "unknown status 'sleeping'" in msgs[5] and "first on line 2" in msgs[6] and "2 field(s)" in msgs[7]
    assert reg.list() == [] and reg.audit_log() == []
    for bad, fragment in [("", "empty file"), ("id,groups\nx,y\n", "no device_id column"),
                          ("device_id,colour\n", "unknown column(s) 'colour'"),
                          ("device_id,attr.bad key\n", "bad attribute column"),
                          ("device_id,groups,groups\n", "repeated column")]:
        with pytest.raises(RowsRejected) as header:
            parse_csv(bad)
        assert header.value.errors[0][0] == 1 and fragment in header.value.errors[0][1], bad
    # a size limit only an existing device's merged attributes reach: checked in the transaction, rolled back
    reg.add("big", attributes={"a": "x" * 10_000}, actor="t")
    with pytest.raises(RowsRejected) as merged:
        reg.import_csv("device_id,attr.b\nnew-9,1\nbig," + "y" * 10_000 + "\n", actor="t")
    assert merged.value.errors[0][0] == 3 and "too large" in merged.value.errors[0][1]
    assert reg.get("new-9") is None


def test_version_strictly_increases_under_concurrent_writers(store_url: str) -> None:
    """Writers on their own connections: every change gets its own version, committed in order, and a
    reader that sees version v sees exactly the changes up to v (adds only here: v - v0 devices)."""
    writers, per_writer = 4, 15
    regs = [DeviceRegistry(store_url) for _ in range(writers + 1)]
    reader = regs[-1]
    v0 = reader.version()
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(per_writer):
                regs[i].add(f"w{i}-{j:03d}", groups=[f"g{i}"], actor=f"w{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    def read() -> None:
        while not stop.is_set():
            v, groups = reader.snapshot()
            seen.append((v, len(groups)))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    poller = threading.Thread(target=read)
    poller.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        poller.join(30)
        for r in regs:
            r.close()
    assert not errors, errors
    final = DeviceRegistry(store_url)
    try:
        assert final.version() == v0 + writers * per_writer
        assert len(final.list()) == writers * per_writer
        assert len([e for e in final.audit_log(limit=1000) if e.action == "device.add"]) == writers * per_writer
    finally:
        final.close()
    assert seen, "the reader never read"
    assert all(v - v0 == n for v, n in seen), [s for s in seen if s[0] - v0 != s[1]][:5]
    assert [v for v, _ in seen] == sorted(v for v, _ in seen)  # never backwards


def test_concurrent_adds_of_one_id_give_one_conflict_each(store_url: str) -> None:
    regs = [DeviceRegistry(store_url) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(regs))

    def add(r: DeviceRegistry) -> None:
        barrier.wait(30)
        try:
            r.add("same", actor="t")
            outcomes.append("added")
        except ConflictError:
            outcomes.append("conflict")
        except BaseException as exc:  # reported below
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=add, args=(r,)) for r in regs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes) == ["added", "conflict", "conflict", "conflict"]
        assert [a for _, a, _ in actions(regs[0])] == ["device.add"]
    finally:
        for r in regs:
            r.close()


def test_two_registries_share_one_store(store_url: str) -> None:
    a, b = DeviceRegistry(store_url), DeviceRegistry(store_url)
    try:
        a.add("x", actor="t")
        dev = b.get("x")
        assert dev is not None and b.version() == a.version()
        b.update("x", tags=["t1"], actor="t")
        assert a.get("x") == b.get("x")
    finally:
        a.close()
        b.close()


@pytest.mark.integration
def test_postgresql_connection_lost_and_bad_urls(pg_url: str) -> None:
    url = f"{pg_url}?schema=t_{secrets.token_hex(5)}"
    reg = DeviceRegistry(url)
    try:
        reg.add("d1", actor="t")
        import psycopg

        with psycopg.connect(pg_url, autocommit=True) as admin:  # what a server restart does to the connection
            admin.execute("SELECT pg_terminate_backend(%s)", (reg.backend_pid,))
        dev: Any = reg.get("d1")  # reconnects
        assert dev is not None and dev.id == "d1"
        reg.update("d1", status="retired", actor="t")
        assert reg.list(status="retired")[0].id == "d1"
    finally:
        reg.close()
    with pytest.raises(ConfigError):
        DeviceRegistry("mysql://x/y")
    with pytest.raises(ConfigError):
        DeviceRegistry(f"{pg_url}?schema=bad-name")
    with pytest.raises(BackendError):
        DeviceRegistry("postgresql://postgres@127.0.0.1:1/none")


def test_a_large_import_in_one_transaction(reg: DeviceRegistry) -> None:
    """More rows than one lookup holds (500): every one found, added, changed or left as it was."""
    n = 1_234
    reg.add("dev-0007", groups=["old"], actor="t")
    first = "device_id,groups,attr.i\n" + "".join(f"dev-{i:04d},g{i % 3},{i}\n" for i in range(n))
    v = reg.version()
    assert reg.import_csv(first, actor="t") == {"added": n - 1, "updated": 1, "unchanged": 0}
    assert reg.version() == v + 1  # one change, one version
    again = "device_id,groups,attr.i\n" + "".join(
        f"dev-{i:04d},g{i % 3},{i if i % 100 else 'changed'}\n" for i in range(n))
    assert reg.import_csv(again, actor="t") == {"added": 0, "updated": 13, "unchanged": n - 13}
    assert len(reg.list(group="g1", limit=10_000)) == len(range(1, n, 3))
    dev = reg.get("dev-0100")
    assert dev is not None and dev.attributes == {"i": "changed"} and dev.groups == ("g1",)
    assert reg.group_map()["dev-0007"] == ("g1",)
