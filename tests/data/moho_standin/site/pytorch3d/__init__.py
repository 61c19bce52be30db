"""Stub of pytorch3d: importable, empty (the MOHO stand-in environment needs only the import)."""
