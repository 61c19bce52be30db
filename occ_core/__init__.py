"""occ core: the domain logic of the OCC-MLLM-CoT pipeline as plain, typed Python (no Prefect here)."""

__version__ = "0.1.0"
