"""Prefect tasks: thin wrappers over occ_core (retries, cache policy, tags, artifacts)."""
