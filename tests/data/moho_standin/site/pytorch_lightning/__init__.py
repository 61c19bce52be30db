"""Stub of pytorch_lightning: importable, empty (the MOHO stand-in environment needs only the import)."""
