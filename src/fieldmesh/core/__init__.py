"""fieldmesh.core."""
