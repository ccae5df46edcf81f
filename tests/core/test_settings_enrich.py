"""Enrichment and CDC settings: the spec grammar, env variables, errors that name what to fix."""

from __future__ import annotations

import json

import pytest

from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import EnrichJoinSpec, load_settings, parse_enrich_spec


def test_defaults_and_every_option() -> None:
    s = parse_enrich_spec("public.assets")
    assert (s.table, s.reading_field, s.column, s.fields, s.prefix, s.pk, s.db, s.topic) == (
        "public.assets", "device_id", "device_id", None, None, None, None, None)
    assert s.effective_prefix == "assets."
    s = parse_enrich_spec(" shop.public.assets : meta.asset_tag = tag : fields=threshold, site :prefix=:pk=id,rev ")
    assert s == EnrichJoinSpec(table="public.assets", reading_field="meta.asset_tag", column="tag",
                               fields=("threshold", "site"), prefix="", pk=("id", "rev"), db="shop")
    assert s.effective_prefix == ""
    s = parse_enrich_spec("public.assets:topic=dbz.public.assets:prefix=asset.")
    assert (s.topic, s.effective_prefix) == ("dbz.public.assets", "asset.")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("assets", "schema.table"),
        ("a.b.c.d", "schema.table"),
        ("public.assets:fields", "not key=value"),
        ("public.assets:fields=", "at least one column"),
        ("public.assets:db=", "needs a value"),
        ("public.assets:device_id=", "needs a column"),
        ("public.assets:device_id=a:device_id=b", "two join conditions"),
        ("public.assets:pk=id:pk=id", "given twice"),
        ("public.assets:meta=tag", "meta.<name>"),
        ("public.assets:device_id.x=tag", "meta.<name>"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"\S") as exc:
        parse_enrich_spec(spec)
    assert says in str(exc.value) and repr(spec.strip()) in str(exc.value)


def test_env_variable_takes_specs_separated_by_semicolons_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDMESH__ENRICH__JOINS", "public.assets:fields=threshold; public.maint:pk=id")
    monkeypatch.setenv("FIELDMESH__ENRICH__DATABASE", "plant")
    monkeypatch.setenv("FIELDMESH__CDC__SOURCE", "postgresql://cdc:s3cret@db/plant")
    monkeypatch.setenv("FIELDMESH__CDC__TABLES", "public.assets,public.maint")
    s = load_settings()
    assert [j.table for j in s.enrich.joins] == ["public.assets", "public.maint"]
    assert s.enrich.database == "plant"
    assert s.cdc.source is not None and s.cdc.source.get_secret_value().endswith("@db/plant")
    assert "s3cret" not in repr(s)
    monkeypatch.setenv("FIELDMESH__ENRICH__JOINS", json.dumps(["public.a:fields=x"]))
    assert load_settings().enrich.joins[0].fields == ("x",)


def test_settings_round_trip_through_json_as_workers_get_them() -> None:
    s = load_settings(enrich={"joins": "public.assets:device_id=device_id:fields=a,b:pk=id", "database": "d"})
    again = load_settings(**json.loads(s.model_dump_json(exclude={"data_dir", "cdc"})))
    assert again.enrich == s.enrich


def test_invalid_settings_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="FIELDMESH__ENRICH__JOINS") as exc:
        load_settings(enrich={"joins": "assets"})
    assert "schema.table" in str(exc.value)
    with pytest.raises(ConfigError, match="FIELDMESH__CDC__NAME"):
        load_settings(cdc={"name": "Bad-Slot"})
