"""``python -m fieldmesh.edge run --config edge.yaml`` (also accepts ``--config`` alone)."""

from __future__ import annotations

import sys

from fieldmesh.edge.cli import app

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("-") and sys.argv[1] not in ("--help", "-h"):
        sys.argv.insert(1, "run")
    app()
