"""fieldmesh.stream."""
