"""Stand-in for MOHO's ``models`` package (only what the bridge's prep step imports)."""
