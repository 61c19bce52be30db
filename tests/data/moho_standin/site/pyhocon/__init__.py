"""Stub of pyhocon: importable, empty (the MOHO stand-in environment needs only the import)."""
