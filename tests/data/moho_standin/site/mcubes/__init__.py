"""Stub of mcubes: importable, empty (the MOHO stand-in environment needs only the import)."""
