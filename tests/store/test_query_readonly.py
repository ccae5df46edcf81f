"""``fieldmesh query`` is read-only: no statement may touch a file (issue 8, defect 7).

Each statement kind is run through the CLI against a real store; each must exit 2 with a message
saying it was refused, and leave the file system exactly as it was (no file created, none changed).
SQLite: an authorizer on the reader. PostgreSQL: text check, one prepared statement, a READ ONLY
transaction and, for a privileged login (the test's ``postgres`` is a superuser), the role
``pg_read_all_data``, under which the server itself refuses COPY to files, lo_export, pg_read_file.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.store import load_store

runner = CliRunner()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time.

    The WAL index (``-shm``, shared memory) is written by every WAL reader to register its snapshot:
    for it only the size counts.
    """
    return {
        str(p.relative_to(root)): (p.stat().st_size, 0 if p.name.endswith("-shm") else p.stat().st_mtime_ns)
        for p in root.rglob("*")
    }


# ---- SQLite --------------------------------------------------------------------------------------

SQLITE_REFUSED = {
    "attach": "ATTACH DATABASE '{out}/attached.db' AS x",
    "vacuum_into": "VACUUM INTO '{out}/copy.db'",
    "vacuum": "VACUUM",
    "detach": "DETACH DATABASE main",
    "journal_mode": "PRAGMA journal_mode=DELETE",
    "wal_checkpoint": "PRAGMA wal_checkpoint(TRUNCATE)",
    "temp_store_directory": "PRAGMA temp_store_directory='{out}'",
    "writable_schema": "PRAGMA writable_schema=ON",
    "load_extension": "SELECT load_extension('{out}/evil')",
    "temp_table": "CREATE TEMP TABLE t AS SELECT 1",
    "create_table": "CREATE TABLE t (a)",
    "delete": "DELETE FROM segments",
    "reindex": "REINDEX",
    "analyze": "ANALYZE",
    "begin": "BEGIN IMMEDIATE",
}


@pytest.fixture
def sqlite_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    load_store(f"sqlite:///{data}/store.db").close()
    (tmp_path / "out").mkdir()
    # a first read, so that the reader's own WAL index exists before the snapshot
    assert runner.invoke(app, ["query", "SELECT count(*) FROM readings", "--data-dir", str(data)]).exit_code == 0
    return tmp_path


@pytest.mark.parametrize("kind", sorted(SQLITE_REFUSED))
def test_sqlite_query_touching_files_is_refused(sqlite_dir: Path, kind: str) -> None:
    before = _tree(sqlite_dir)
    sql = SQLITE_REFUSED[kind].format(out=sqlite_dir / "out")
    r = runner.invoke(app, ["query", sql, "--data-dir", str(sqlite_dir / "data")])
    assert r.exit_code == 2, r.output
    assert "query refused" in r.output and "read-only" in r.output, r.output
    assert _tree(sqlite_dir) == before, f"{kind} changed the file system"


def test_sqlite_reads_still_work(sqlite_dir: Path) -> None:
    data = str(sqlite_dir / "data")
    for sql, want in [
        ("SELECT count(*) AS n FROM readings", '[{"n": 0}]'),
        ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) SELECT sum(x) AS s FROM c",
         '[{"s": 6}]'),
        ("SELECT count(*) AS n FROM json_each('[1, 2]')", '[{"n": 2}]'),
        ("SELECT count(*) AS n FROM pragma_table_info('devices')", '[{"n": 6}]'),
        ("PRAGMA journal_mode", '[{"journal_mode": "wal"}]'),
    ]:
        r = runner.invoke(app, ["query", sql, "--data-dir", data, "--json"])
        assert r.exit_code == 0 and want in r.output, (sql, r.output)
    assert runner.invoke(app, ["query", "EXPLAIN QUERY PLAN SELECT * FROM readings", "--data-dir", data]).exit_code == 0


# ---- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[tuple[str, Path, int]]:
    """(store URL, a directory the server may write to, the oid of a large object)."""
    # the server runs as another OS user: a directory it can reach and write to, so only our guard stops it
    out = Path(tempfile.mkdtemp(prefix="fm-query-out-", dir="/tmp"))
    out.chmod(0o777)
    url = f"{pg_url}?schema=t_{secrets.token_hex(5)}"
    w = load_store(url)
    con = w._w  # type: ignore[attr-defined]
    oid = con.execute("SELECT lo_from_bytea(0, 'secret')").fetchone()[0]
    # a view owned by the superuser that exports a file: only the role drop (layer 3) stops it
    con.execute(f"CREATE VIEW leak AS SELECT lo_export({oid}, '{out / 'view.bin'}') AS n")
    try:
        yield url, out, oid
    finally:
        con.execute(f"SELECT lo_unlink({oid})")
        w.close()
        shutil.rmtree(out)


PG_REFUSED = {
    "copy_to_file": "COPY (SELECT 1) TO '{out}/copy.txt'",
    "copy_to_program": "COPY (SELECT 1) TO PROGRAM 'touch {out}/program'",
    "lo_export": "SELECT lo_export({oid}, '{out}/lo.bin')",
    "lo_export_quoted": "SELECT pg_catalog.\"lo_export\"({oid}, '{out}/lo2.bin')",
    "lo_export_unicode_escape": "SELECT U&\"\\006Co_export\"({oid}, '{out}/lo3.bin')",
    "lo_export_in_a_view": "SELECT * FROM leak",
    "two_statements": "SELECT 1; COPY (SELECT 1) TO '{out}/second.txt'",
    "reset_role_then_copy": "SELECT 1; RESET ROLE; COPY (SELECT 1) TO '{out}/reset.txt'",
    "set_config_role": "SELECT set_config('role', 'postgres', true), lo_export({oid}, '{out}/cfg.bin')",
    "query_to_xml": "SELECT query_to_xml('COPY (SELECT 1) TO ''{out}/xml.txt''', true, true, '')",
    "pg_read_file": "SELECT pg_read_file('/etc/hostname')",
    "do_block": "DO $$BEGIN EXECUTE 'COPY (SELECT 1) TO ''{out}/do.txt'''; END$$",
    "checkpoint": "CHECKPOINT",
    "delete": "DELETE FROM counters",
}


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(PG_REFUSED))
def test_postgres_query_touching_files_is_refused(pg_store: tuple[str, Path, int], kind: str) -> None:
    url, out, oid = pg_store
    sql = PG_REFUSED[kind].format(out=out, oid=oid)
    r = runner.invoke(app, ["query", sql, "--store-url", url])
    assert r.exit_code == 2, r.output
    assert any(s in r.output for s in ("query refused", "multiple commands", "read-only transaction")), r.output
    assert list(out.iterdir()) == [], f"{kind} created files"


@pytest.mark.integration
def test_postgres_reads_still_work(pg_store: tuple[str, Path, int]) -> None:
    url, _, _ = pg_store
    for sql, want in [
        ("SELECT count(*) AS n FROM readings", '[{"n": 0}]'),
        ("/* a comment */ (SELECT 2 AS n)", '[{"n": 2}]'),
        ("WITH a AS (SELECT 3 AS n) SELECT * FROM a", '[{"n": 3}]'),
        ("SELECT current_user AS u", '[{"u": "pg_read_all_data"}]'),  # the superuser login dropped its rights
    ]:
        r = runner.invoke(app, ["query", sql, "--store-url", url, "--json"])
        assert r.exit_code == 0 and want in r.output, (sql, r.output)
