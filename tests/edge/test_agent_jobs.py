"""The edge agent's own job path: a real EdgeAgent, a real controller, a private Mosquitto.

A signed model is installed into the agent's spare slot and scored with at once; a signed model that
does not load is reverted by the agent itself (the execution fails, the old model keeps scoring); a
tampered one is refused; a rollback job brings the previous model back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fieldmesh.control.jobs import JobSpec, Targets
from fieldmesh.edge.agent import EdgeAgent
from fieldmesh.edge.config import parse_config
from fieldmesh.edge.infer import DEFAULT_MODEL, EwmaScorer, OnnxScorer
from fieldmesh.edge.ota import SlotStore
from fieldmesh.store.jobs import JobStore
from fmtest.fleet import artifact, controller, signing_key, wait_for
from fmtest.mqtt import PrivateMosquitto

pytestmark = pytest.mark.integration


def test_agent_installs_reverts_and_refuses_models(tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path / "mosquitto")
    key, _ = signing_key()
    pub = tmp_path / "signing.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    good_bytes = DEFAULT_MODEL.read_bytes()
    good, _ = artifact(key, "2.0", data=good_bytes)
    good["url"] = (tmp_path / "good.onnx").as_uri()
    (tmp_path / "good.onnx").write_bytes(good_bytes)
    bad_bytes = b"not an onnx model at all"
    bad, _ = artifact(key, "3.0", data=bad_bytes)  # signed by the publisher, but broken
    bad["url"] = (tmp_path / "bad.onnx").as_uri()
    (tmp_path / "bad.onnx").write_bytes(bad_bytes)
    tampered = dict(good, version="2.0", url=(tmp_path / "tampered.onnx").as_uri())
    (tmp_path / "tampered.onnx").write_bytes(good_bytes[:-1] + b"\0")
    cfg = parse_config({
        "sources": [{"simulator": {"devices": 2, "interval_ms": 200}}],
        "buffer": {"path": str(tmp_path / "buf"), "fsync": "never"},
        "uplink": {"port": broker.port, "client_id": "edge-7", "protocol": "3.1.1"},
        "infer": {"scorer": "ewma"},
        "jobs": {"enabled": True, "trusted_keys": [str(pub)], "confirm_after_s": 1.0},
    })
    store = JobStore(f"sqlite:///{tmp_path}/store.db")
    agent = EdgeAgent(cfg)
    assert isinstance(agent.pipeline.scorer, EwmaScorer)

    def job(job_id: str, doc: dict[str, object]) -> None:
        store.create_job(JobSpec(job_id=job_id, document=doc, targets=Targets(devices=("edge-7",)), timeout_s=20),
                         ["edge-7"], actor="test")

    def state(job_id: str) -> str:
        return store.executions(job_id=job_id)[0].state

    async def go() -> None:
        task = asyncio.create_task(agent.run(drain_s=0))
        async with controller(store, broker.port):
            job("install-good", {"op": "install", "artifact": good})
            await wait_for(lambda: state("install-good") == "succeeded", 30, "the good model")
            assert isinstance(agent.pipeline.scorer, OnnxScorer)
            slots = SlotStore(tmp_path / "buf" / "ota", trusted_keys={})
            assert slots.active("model").pending  # type: ignore[union-attr]  # on trial for confirm_after_s
            await wait_for(lambda: not slots.active("model").pending, 10, "the confirmation")  # type: ignore[union-attr]
            job("install-bad", {"op": "install", "artifact": bad})
            await wait_for(lambda: state("install-bad") == "failed", 30, "the broken model's failure")
            ex = store.executions(job_id="install-bad")[0]
            assert ex.details["reason"] == "health_check" and ex.details["reverted_to"] == "2.0"
            assert isinstance(agent.pipeline.scorer, OnnxScorer)  # the good model again
            job("install-tampered", {"op": "install", "artifact": tampered})
            await wait_for(lambda: state("install-tampered") == "rejected", 30, "the tampered model's refusal")
            assert store.executions(job_id="install-tampered")[0].details["reason"] == "hash_mismatch"
            job("back", {"op": "rollback", "kind": "model", "from_version": "2.0"})
            await wait_for(lambda: state("back") == "succeeded", 30, "the rollback")
            assert isinstance(agent.pipeline.scorer, EwmaScorer)  # the configured scorer: no slot before 2.0
            job("what", {"op": "report"})
            await wait_for(lambda: state("what") == "succeeded", 30, "the report")
            assert store.executions(job_id="what")[0].details == {"firmware": None, "model": None}
            job("odd", {"op": "format-disk"})
            await wait_for(lambda: state("odd") == "rejected", 30, "the unknown op")
        agent.stop()
        stats = await task
        assert stats["jobs"]["succeeded"] == 3 and stats["jobs"]["failed"] == 1 and stats["jobs"]["rejected"] == 2

    try:
        asyncio.run(go())
    finally:
        broker.stop()
        store.close()


def test_a_model_that_no_longer_loads_at_start_is_reverted(tmp_path: Path) -> None:
    key, trusted = signing_key()
    pub = tmp_path / "signing.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    slots = SlotStore(tmp_path / "buf" / "ota", trusted_keys=trusted)
    good, gb = artifact(key, "2.0", data=DEFAULT_MODEL.read_bytes())
    slots.install(good, gb)
    slots.boot("model")
    slots.confirm("model")
    bad, bb = artifact(key, "3.0", data=b"garbage")
    slots.install(bad, bb)  # installed, then the power went: never checked
    cfg = parse_config({"sources": [{"simulator": {}}], "buffer": {"path": str(tmp_path / "buf")},
                        "uplink": {"client_id": "edge-8"}, "jobs": {"enabled": True, "trusted_keys": [str(pub)]}})
    agent = EdgeAgent(cfg)
    assert isinstance(agent.pipeline.scorer, OnnxScorer)
    assert slots.active("model").version == "2.0"  # type: ignore[union-attr]


def test_an_agent_that_keeps_dying_with_a_new_model_goes_back_by_itself(tmp_path: Path) -> None:
    key, trusted = signing_key()
    pub = tmp_path / "signing.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    slots = SlotStore(tmp_path / "buf" / "ota", trusted_keys=trusted)
    v1, b1 = artifact(key, "1.0", data=DEFAULT_MODEL.read_bytes())
    slots.install(v1, b1)
    slots.boot("model")
    slots.confirm("model")
    v2, b2 = artifact(key, "2.0", data=DEFAULT_MODEL.read_bytes())
    slots.install(v2, b2)  # passed its check (it loads), then the agent died before confirm_after_s
    cfg = parse_config({"sources": [{"simulator": {}}], "buffer": {"path": str(tmp_path / "buf")},
                        "uplink": {"client_id": "edge-9"},
                        "jobs": {"enabled": True, "trusted_keys": [str(pub)], "max_boot_attempts": 2}})
    for _ in range(2):  # each start of the agent is a trial start of 2.0 ... which dies again
        EdgeAgent(cfg)
        assert slots.active("model").version == "2.0"  # type: ignore[union-attr]
    EdgeAgent(cfg)  # the third start: back to 1.0, by itself
    assert slots.active("model").version == "1.0"  # type: ignore[union-attr]
    assert not slots.active("model").pending  # type: ignore[union-attr]
