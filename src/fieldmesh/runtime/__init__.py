"""fieldmesh.runtime."""
