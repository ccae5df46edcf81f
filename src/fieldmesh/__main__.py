"""``python -m fieldmesh`` is the ``fieldmesh`` command."""

from fieldmesh.cli.main import main

main()
