"""Python clients of the fieldmesh REST API."""

from fieldmesh.client.features import FeatureClient, OnlineFeatures

__all__ = ["FeatureClient", "OnlineFeatures"]
