"""Uplink against private brokers: mutual TLS, MQTT 3.1.1 fallback, refused credentials, twin and
anomalies topics."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Collector, free_port, wait_for

pytestmark = pytest.mark.integration


def _sim_cfg(tmp_path: Path, port: int, prefix: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "agent": {"stats_interval_s": 0.2},
        "sources": [{"simulator": {"devices": 3, "interval_ms": 50, "prefix": prefix, "seed": 2}}],
        "infer": {"scorer": "none"},
        "buffer": {"path": str(tmp_path / "buf")},
        "uplink": {"port": port, "linger_ms": 100, "backoff_initial_ms": 100, "backoff_max_ms": 500},
        "twin": {"enabled": False},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = cfg[k] | v
        else:
            cfg[k] = v
    return cfg


def _certs(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: Any, p: Path) -> None:
        p.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldmesh test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, server in (("server", True), ("client", False)):
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fm-{name}")]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        out[name] = d / f"{name}.pem"
        out[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = d / f"{name}.key"
        write_key(k, out[f"{name}_key"])
    return out


def test_mutual_tls(
    tmp_path: Path, mosquitto_factory: Any, collector_factory: Any, agent_factory: Any, prefix: str
) -> None:
    c = _certs(tmp_path)
    plain, tls_port = free_port(), free_port()
    broker = mosquitto_factory(
        port=tls_port,
        extra=[
            f"listener {plain} 127.0.0.1",
            f"listener {tls_port} 127.0.0.1",
            f"cafile {c['ca']}",
            f"certfile {c['server']}",
            f"keyfile {c['server_key']}",
            "require_certificate true",
            "use_identity_as_username true",
        ],
    )
    coll = collector_factory(plain, prefix)
    ok = agent_factory(
        _sim_cfg(
            tmp_path / "ok",
            broker.port,
            prefix,
            uplink={
                "port": tls_port,
                "linger_ms": 100,
                "tls": {"ca": str(c["ca"]), "cert": str(c["client"]), "key": str(c["client_key"])},
            },
        )
    )
    ok.start()
    wait_for(lambda: coll.count() >= 30, 20, "readings over mutual TLS")
    assert ok.stats()["uplink"]["state"] == "connected"
    assert ok.stop() == 0
    # without a client certificate the broker refuses the handshake: the agent says so and keeps buffering
    (tmp_path / "nocert").mkdir()
    bad = agent_factory(
        _sim_cfg(
            tmp_path / "nocert",
            broker.port,
            prefix + "x",
            uplink={"port": tls_port, "tls": {"ca": str(c["ca"])}},
        )
    )
    bad.workdir = tmp_path / "nocert"
    bad.start()
    wait_for(lambda: bad.stats().get("uplink", {}).get("connect_failures", 0) >= 2, 20, "refused handshakes")
    s = bad.stats()
    assert s["uplink"]["connects"] == 0 and s["buffer"]["pending_readings"] > 0
    bad.stop()


def test_falls_back_to_mqtt311(tmp_path: Path, agent_factory: Any, prefix: str) -> None:
    from fieldmesh.runtime.natsserver import EmbeddedNats

    mport = free_port()
    nats = EmbeddedNats(store_dir=tmp_path / "nats", port=free_port(), mqtt_port=mport)
    nats.start()
    try:
        coll = Collector(mport, prefix, v5=False, topics=["devices/+/telemetry/+"])
        agent = agent_factory(_sim_cfg(tmp_path, mport, prefix))
        agent.start()
        wait_for(lambda: coll.count() >= 30, 30, "readings through an MQTT 3.1.1-only broker")
        st = agent.stats()["uplink"]
        assert st["protocol"] == "3.1.1"
        topics = {m[0].split("/", 2)[2] for m in coll.messages}
        assert topics == {"telemetry/zstd"}  # compression announced by the topic suffix
        assert not coll.rejects
        assert agent.stop() == 0
        coll.close()
    finally:
        nats.stop()


def test_refused_credentials_clear_error_keeps_buffering(
    tmp_path: Path, mosquitto_factory: Any, agent_factory: Any, prefix: str
) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(pw), "edge", "right"], check=True, capture_output=True
    )
    broker_port = free_port()
    mosquitto_factory(
        port=broker_port,
        extra=[f"listener {broker_port} 127.0.0.1", f"password_file {pw}", "allow_anonymous false"],
    )
    cfg = _sim_cfg(
        tmp_path,
        broker_port,
        prefix,
        uplink={"port": broker_port, "username": "edge", "password": "wrong", "backoff_max_ms": 300},
    )
    agent = agent_factory(cfg)
    agent.start()
    wait_for(lambda: agent.stats().get("uplink", {}).get("state") == "auth_failed", 20, "auth failure state")
    p1 = agent.stats()["buffer"]["pending_readings"]
    time.sleep(1.0)
    s = agent.stats()
    assert s["buffer"]["pending_readings"] > p1, "the agent keeps buffering"
    assert s["uplink"]["auth_failures"] >= 1
    agent.stop()
    assert "refused the credentials" in agent.output()


def test_twin_config_and_anomalies_topic(
    tmp_path: Path, mosquitto_factory: Any, collector_factory: Any, agent_factory: Any, prefix: str
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = mosquitto_factory()
    coll = collector_factory(broker.port, prefix)
    cfg = _sim_cfg(
        tmp_path,
        broker.port,
        prefix,
        infer={"scorer": "ewma", "warmup": 5},
        twin={"enabled": True},
        uplink={"port": broker.port, "linger_ms": 400},
    )
    cfg["sources"][0]["simulator"]["spike_prob"] = 0.05
    agent = agent_factory(cfg)
    agent.start()
    dev = f"{prefix}-00001"
    wait_for(lambda: coll.count() >= 30, 20, "first readings")
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    pub.publish(
        f"devices/{dev}/config",
        json.dumps({"version": 2, "mode": "window", "window_ms": 1000}),
        qos=1,
        retain=True,
    ).wait_for_publish(5)

    def states() -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in coll.topic_messages("state") if t == f"devices/{dev}/state"]

    wait_for(
        lambda: any(s["version"] == 2 and s["status"] == "applied" for s in states()), 20, "applied state"
    )
    wait_for(
        lambda: any(d == dev and (r["meta"] or {}).get("agg") == "window" for d, r in coll.readings),
        20,
        "window aggregates after the live config change",
    )
    pub.publish(
        f"devices/{dev}/config", json.dumps({"version": 3, "mode": "bogus"}), qos=1, retain=True
    ).wait_for_publish(5)
    wait_for(lambda: any(s.get("status") == "rejected" for s in states()), 20, "rejected state")
    rej = next(s for s in states() if s.get("status") == "rejected")
    assert rej["version"] == 3 and "mode" in rej["error"]
    pub.publish(f"devices/{dev}/config", b"", retain=True).wait_for_publish(5)  # clear the retained config
    pub.loop_stop()
    assert agent.stop() == 0
    # anomalies: each is on devices/{id}/anomalies before the batch that carries the same reading
    msgs = list(coll.messages)
    an = [(i, json.loads(p)) for i, (t, p, _) in enumerate(msgs) if t.endswith("/anomalies")]
    assert len(an) >= 3
    import zstandard

    tele: dict[tuple[str, int], int] = {}
    for i, (t, p, _) in enumerate(msgs):
        if t.split("/")[2] == "telemetry":
            body = json.loads(zstandard.ZstdDecompressor().decompress(p, max_output_size=1 << 24))
            for r in body["readings"]:
                if r.get("seq") is not None:
                    tele.setdefault((body["device_id"], r["seq"]), i)
    for i, a in an:
        assert a["meta"]["decision"] == "anomaly"
        key = (a["device_id"], a["seq"])
        assert key in tele and i < tele[key], "an anomaly goes ahead of its batch"
