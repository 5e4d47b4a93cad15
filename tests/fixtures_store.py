"""Fixtures: a real SeaweedFS S3 server on loopback (owner: store)."""
