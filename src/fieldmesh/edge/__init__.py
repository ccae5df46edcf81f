"""fieldmesh.edge."""
