"""fieldmesh.cli."""
