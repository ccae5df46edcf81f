"""Kafka URL parsing and client settings (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldmesh.bus.kafka import KafkaBus, parse_kafka_url, redact_url
from fieldmesh.core.errors import ConfigError


def test_settings_pass_through_with_client_prefixes() -> None:
    url = (
        "kafka://b1:9093,b2:9093?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512"
        "&ssl.ca.location=/etc/ca.pem&producer.linger.ms=20&consumer.session.timeout.ms=6000&replication_factor=3"
    )
    brokers, common, prod, cons, fm = parse_kafka_url(url)
    assert fm == {"replication_factor": "3"}
    assert brokers == "b1:9093,b2:9093"
    assert common == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "ssl.ca.location": "/etc/ca.pem",
    }
    assert prod == {"linger.ms": "20"} and cons == {"session.timeout.ms": "6000"}
    bus = KafkaBus(url)
    assert bus.replication_factor == 3
    pc = bus.producer_config()
    assert pc["linger.ms"] == "20" and pc["enable.idempotence"] is True and pc["compression.type"] == "lz4"
    assert "session.timeout.ms" not in pc
    cc = bus.consumer_config("g1")
    assert cc["group.id"] == "g1" and cc["enable.auto.commit"] is False and cc["session.timeout.ms"] == "6000"
    assert cc["security.protocol"] == "SASL_SSL"


def test_credentials_in_the_url_become_sasl_settings() -> None:
    _, common, *_ = parse_kafka_url("kafka://fm%40corp:p%3Ass@b1:9093?sasl.mechanism=PLAIN")
    assert common["sasl.username"] == "fm@corp" and common["sasl.password"] == "p:ss"


@pytest.mark.parametrize("url", ["nats://x:4222", "kafka://", "kafka:///x"])
def test_bad_urls_name_the_setting(url: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_kafka_url(url)
    assert ei.value.key == "bus_url"


def test_bad_replication_factor() -> None:
    with pytest.raises(ConfigError, match="replication_factor"):
        KafkaBus("kafka://b1:9092?replication_factor=three")


def test_password_file_keeps_the_secret_off_the_url(tmp_path: Path) -> None:
    pw = tmp_path / "kafka.pw"
    pw.write_text("s3cret\n")
    url = f"kafka://fm@b1:9093?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-256&password_file={pw}"
    _, common, _, _, fm = parse_kafka_url(url)
    assert common["sasl.username"] == "fm" and common["sasl.password"] == "s3cret"
    assert fm == {} and "password_file" not in common
    assert KafkaBus(url).producer_config()["sasl.password"] == "s3cret"
    with pytest.raises(ConfigError, match="password_file") as ei:
        parse_kafka_url(f"kafka://fm@b1:9093?password_file={tmp_path / 'missing'}")
    assert ei.value.key == "bus_url"


def test_messages_show_urls_without_passwords() -> None:
    assert redact_url("kafka://fm:p%3Ass@b1:9093?x=1") == "kafka://fm:***@b1:9093?x=1"
    assert redact_url("kafka://b1:9093?sasl.password=abc&producer.sasl.password=d") == \
        "kafka://b1:9093?sasl.password=***&producer.sasl.password=***"
    with pytest.raises(ConfigError) as ei:
        KafkaBus("kafka://fm:topsecret@b1:9092?replication_factor=three")
    assert "topsecret" not in str(ei.value)
