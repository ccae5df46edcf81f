"""``--features FILE`` and ``--online-url`` on ``up`` and ``process``: a bad file or URL stops the start
(exit 2, naming the view and field, or the URL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fieldmesh.cli.main import app

runner = CliRunner()

BAD = """
feature_views:
  - {name: pump_stats, entity: device, metrics: [t], windows: [90s], hop: 1m, aggregations: [mean], ttl: 1h}
"""


@pytest.mark.parametrize("command", [["up", "--for", "1"], ["process", "--bus-url", "nats://127.0.0.1:1",
                                                          "--store-url", "sqlite:///x.db"]])
def test_a_bad_features_file_or_online_url_stops_the_start(tmp_path: Path, command: list[str]) -> None:
    bad = tmp_path / "views.yaml"
    bad.write_text(BAD)
    r = runner.invoke(app, [*command, "--features", str(bad)])
    assert r.exit_code == 2, r.output
    said = " ".join(r.output.split())
    assert "pump_stats.windows" in said and "multiple of hop" in said
    missing = runner.invoke(app, [*command, "--features", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "none.yaml" in "".join(missing.output.split())
    url = runner.invoke(app, [*command, "--online-url", "memcached://127.0.0.1:1"])
    assert url.exit_code == 2 and "online store URL" in " ".join(url.output.split()), url.output
