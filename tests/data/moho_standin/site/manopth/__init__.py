"""Stub of manopth: importable, empty (the MOHO stand-in environment needs only the import)."""
