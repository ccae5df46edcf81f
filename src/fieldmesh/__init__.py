"""fieldmesh: edge-to-lakehouse IoT telemetry, exact and durable.

The package is laid out by stage, left to right along the data flow:
``core`` (pure model) -> ``edge`` -> ``gateway`` -> ``bus`` -> ``stream`` -> ``store``,
with ``runtime``, ``api`` and ``cli`` on top wiring them together.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
