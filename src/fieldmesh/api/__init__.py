"""fieldmesh.api."""
