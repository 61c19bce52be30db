"""Prefect flows: wiring only (which task after which, fan-out over shards, parameters)."""
