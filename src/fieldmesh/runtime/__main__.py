"""``python -m fieldmesh.runtime`` is ``fieldmesh up``."""

from fieldmesh.cli.main import main

main()
