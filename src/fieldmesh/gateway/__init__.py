"""fieldmesh.gateway."""
