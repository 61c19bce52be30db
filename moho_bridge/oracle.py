"""``oracle`` backend: the ground-truth object mesh, an upper bound for any reconstruction.

The mesh is the ShapeNet model named by the meta's ``obj_path`` (re-rooted under the local ShapeNet
copy), in its own model frame; the pose is ``object_to_camera(meta)`` from ``affine_transform``. Its
renders show what a perfect reconstruction would give; every manifest row is labelled an upper bound.

    occ reconstruct --root ROOT --split test --backend oracle --out OUT
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from moho_bridge.protocol import PerSampleReconstructor
from occ_core.obman import SampleRef, load_meta, object_to_camera, resolve_mesh_path
from occ_core.render import load_mesh


class OracleReconstructor(PerSampleReconstructor):
    """The ``oracle`` backend (see the module docstring)."""

    name = "oracle"

    def __init__(self, shapenet_root: Path | None = None) -> None:
        """Args:
        shapenet_root: Local ShapeNet root; None means ``{dataset root}/shapenet``.
        """
        self.shapenet_root = Path(shapenet_root) if shapenet_root is not None else None

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": "oracle",
            "label": "upper bound: ground-truth mesh and pose, not a reconstruction",
            "mesh": "ShapeNet model from meta obj_path",
            "pose": "object_to_camera(meta) from affine_transform",
        }

    def build(self, sample: SampleRef) -> tuple[trimesh.Trimesh, np.ndarray]:
        meta = load_meta(sample.meta_path)
        mesh = load_mesh(resolve_mesh_path(meta, sample.root, self.shapenet_root))
        if mesh.visual.kind == "texture":
            # PLY keeps no texture; sample it into vertex colours so the renders keep the look.
            mesh.visual = mesh.visual.to_color()
        return mesh, object_to_camera(meta)
