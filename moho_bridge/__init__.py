"""moho_bridge: 3D reconstruction backends behind one protocol (moho, depth, oracle).

``get_reconstructor(name, **opts)`` picks a backend; ``occ reconstruct`` and ``occ render`` drive them
(moho_bridge/cli.py). This package imports occ_core, never the other way round, and never Prefect.
"""
