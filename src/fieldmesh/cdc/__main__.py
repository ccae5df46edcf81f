"""``python -m fieldmesh.cdc``: the CDC role (same options as ``fieldmesh cdc``)."""

from __future__ import annotations

from fieldmesh.cli.cdc import main

if __name__ == "__main__":
    main()
