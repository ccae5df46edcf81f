"""Test helpers: oracles computed independently of fieldmesh, and process fixtures."""
