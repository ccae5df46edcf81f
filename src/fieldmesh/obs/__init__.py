"""fieldmesh.obs."""
