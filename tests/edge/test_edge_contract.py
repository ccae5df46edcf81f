"""The device's side of a data contract: refused readings never leave the device, the schema is registered.

Registration talks to the real API (uvicorn on a free port, the registry over a SQLite store, API keys
required), as a device would.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from conftest import free_port
from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.agent import EdgeAgent
from fieldmesh.edge.config import parse_config
from fieldmesh.edge.contract import ReadingContract, register_schema
from fieldmesh.edge.sources.base import SourceBatch
from fieldmesh.schema.registry import SchemaRegistry
from fieldmesh.store.access import AccessStore
from fieldmesh.store.schemas import SchemaStore

SCHEMA = {
    "type": "object",
    "required": ["device_id", "ts", "measurements"],
    "properties": {
        "device_id": {"type": "string", "pattern": "^c-"},
        "ts": {"type": "integer"},
        "measurements": {
            "type": "object",
            "required": ["x"],
            "properties": {"x": {"type": "number", "maximum": 7}},
        },
    },
}


class CountingSource:
    """Ten readings of one device, x = 1..10."""

    name = "counting"

    def __init__(self) -> None:
        self.acked = 0

    async def batches(self) -> AsyncIterator[SourceBatch]:
        for n in range(1, 11):
            yield SourceBatch(device_ids=["c-1"], ts_ms=np.array([1_763_800_000_000 + n], dtype=np.int64),
                              cols={"x": np.array([float(n)])})
            await asyncio.sleep(0)

    async def ack(self, batch: SourceBatch) -> None:
        self.acked += 1

    async def close(self) -> None:
        pass


def test_refused_readings_are_kept_on_the_device_and_never_buffered(tmp_path: Path) -> None:
    schema = tmp_path / "reading.schema.json"
    schema.write_text(json.dumps(SCHEMA))
    cfg = parse_config({
        "sources": [{"simulator": {}}],
        "buffer": {"path": str(tmp_path / "buf")},
        "uplink": {"port": free_port()},
        "infer": {"scorer": "none"},
        "twin": {"enabled": False},
        "schema": {"file": str(schema)},
    })
    src = CountingSource()
    stats = asyncio.run(EdgeAgent(cfg, sources=[src]).run(duration_s=1.0, drain_s=0))
    assert src.acked == 10  # refused readings are acknowledged to the source: they are kept, not lost
    assert stats["buffer"]["appended_readings"] == 7
    assert stats["schema"]["checked"] == 10 and stats["schema"]["rejected"] == 3
    assert stats["schema"]["by_path"] == {"$.measurements.x": 3}
    rejects = [json.loads(x) for x in (tmp_path / "buf" / "state" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reading"]["measurements"]["x"] for r in rejects] == [8.0, 9.0, 10.0]
    assert all(r["path"] == "$.measurements.x" and "maximum" in r["reason"] for r in rejects)


def test_a_schema_file_that_is_no_schema_is_a_clear_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 12}')
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        ReadingContract.from_file(bad, rejects_path=tmp_path / "r.jsonl")
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        ReadingContract.from_file(bad, rejects_path=tmp_path / "r.jsonl")
    with pytest.raises(ConfigError, match=r"schema\.subject needs schema\.registry_url"):
        parse_config({"sources": [{"simulator": {}}], "schema": {"file": str(bad), "subject": "s"}})


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The API with its registry on a free port: (registry base URL, an operator's ``id:secret``)."""
    store_url = f"sqlite:///{tmp_path / 'api.db'}"
    keys = AccessStore(store_url)
    secret = keys.create_key(role="operator", actor="test")[1]
    keys.close()
    key_id = secret.split("_")[1]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(store_url, access=Access(store_url, local_only=False),
                   schema_registry=SchemaRegistry(SchemaStore(store_url))),
        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/api/v1/registry", f"{key_id}:{secret}"
    server.should_exit = True
    thread.join(10)


def test_the_agent_registers_its_schema_and_learns_of_an_incompatible_one(
        tmp_path: Path, registry: tuple[str, str]) -> None:
    url, auth = registry
    c = ReadingContract(schema_text=json.dumps(SCHEMA), rejects_path=tmp_path / "r.jsonl")
    asyncio.run(register_schema(c, registry_url=url, subject="edge-c-value", auth=auth, stop=asyncio.Event()))
    assert c.stats.schema_id is not None and c.stats.registration_error is None
    first = c.stats.schema_id
    again = ReadingContract(schema_text=json.dumps(SCHEMA), rejects_path=tmp_path / "r.jsonl")
    asyncio.run(register_schema(again, registry_url=url, subject="edge-c-value", auth=auth, stop=asyncio.Event()))
    assert again.stats.schema_id == first  # the same schema: the same id

    # a new required field breaks BACKWARD (the default level): the registry refuses, the agent says why
    stricter = json.loads(json.dumps(SCHEMA))
    stricter["required"].append("seq")
    stricter["properties"]["seq"] = {"type": "integer"}
    stricter["additionalProperties"] = False
    s = ReadingContract(schema_text=json.dumps(stricter), rejects_path=tmp_path / "r.jsonl")
    asyncio.run(register_schema(s, registry_url=url, subject="edge-c-value", auth=auth, stop=asyncio.Event()))
    assert s.stats.schema_id is None
    assert s.stats.registration_error is not None and s.stats.registration_error.startswith("409")

    # without a key the registry refuses too: a 401 is not retried forever
    n = ReadingContract(schema_text=json.dumps(SCHEMA), rejects_path=tmp_path / "r.jsonl")
    asyncio.run(register_schema(n, registry_url=url, subject="edge-c-value", auth=None, stop=asyncio.Event()))
    assert n.stats.registration_attempts == 1 and (n.stats.registration_error or "").startswith("401")


def test_registration_is_retried_while_the_registry_is_unreachable(tmp_path: Path) -> None:
    c = ReadingContract(schema_text=json.dumps(SCHEMA), rejects_path=tmp_path / "r.jsonl")

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(register_schema(
            c, registry_url=f"http://127.0.0.1:{free_port()}/api/v1/registry", subject="s", auth=None,
            stop=stop, initial_s=0.05, cap_s=0.1))
        await asyncio.sleep(0.6)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    assert c.stats.registration_attempts >= 3
    assert c.stats.schema_id is None and (c.stats.registration_error or "").startswith("unreachable")
