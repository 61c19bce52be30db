"""The reconstruction protocol: each backend turns ObMan samples into object-frame meshes plus a pose.

A backend writes ``{out_dir}/{id}.ply`` (vertices in the object frame, per-vertex colours) and reports,
per sample, the object-to-camera transform (OpenCV camera, 4x4) that puts the mesh back in the input
view, and a status. Backends are picked by name:

- ``moho``: the real MOHO, run as a subprocess in its own environment (moho_bridge/moho.py).
- ``depth``: the built-in geometric fallback from the depth map (moho_bridge/depth.py), never MOHO.
- ``oracle``: the ground-truth mesh, an upper bound (moho_bridge/oracle.py).

Bad input never stops a batch: the sample's result carries the file and the reason instead.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import trimesh

from occ_core.errors import BadSample
from occ_core.fsio import atomic_path
from occ_core.obman import SampleRef
from occ_core.render import check_mesh

# name -> "module:class"; imported on use so choosing `depth` never loads the MOHO bridge, and back.
BACKENDS: dict[str, str] = {
    "depth": "moho_bridge.depth:DepthReconstructor",
    "oracle": "moho_bridge.oracle:OracleReconstructor",
    "moho": "moho_bridge.moho:MohoReconstructor",
}


@dataclass(frozen=True)
class ReconResult:
    """What a backend made of one sample.

    Attributes:
        sample_id: The ObMan id.
        ok: True when ``mesh_path`` holds a valid mesh.
        mesh_path: ``{out_dir}/{id}.ply`` in the object frame, or None on failure.
        obj_to_cam: Object-to-camera transform (OpenCV camera) as 16 row-major floats, or None.
        view0_path: The backend's own render of the input view (MOHO writes one), or None.
        error: Why the sample failed, or None.
        error_path: The file the failure is blamed on (for the quarantine record), or None.
    """

    sample_id: str
    ok: bool
    mesh_path: Path | None = None
    obj_to_cam: tuple[float, ...] | None = None
    view0_path: Path | None = None
    error: str | None = None
    error_path: str | None = None

    @classmethod
    def failure(cls, sample_id: str, path: Path | str, reason: str) -> ReconResult:
        """A failed sample, blamed on ``path`` for ``reason``."""
        return cls(sample_id, ok=False, error=reason, error_path=str(path))

    def pose(self) -> np.ndarray:
        """``obj_to_cam`` as a 4x4 array."""
        if self.obj_to_cam is None:
            raise ValueError(f"sample {self.sample_id} has no pose ({self.error})")
        return np.asarray(self.obj_to_cam, dtype=np.float64).reshape(4, 4)


class Reconstructor(Protocol):
    """A reconstruction backend."""

    name: str

    def provenance(self) -> dict[str, Any]:
        """How the meshes were made (method, versions, hashes); stored with every manifest row."""
        ...

    def reconstruct(self, samples: Sequence[SampleRef], out_dir: Path) -> list[ReconResult]:
        """Write ``{out_dir}/{id}.ply`` per sample; one result per sample, in input order."""
        ...


def get_reconstructor(name: str, **opts: Any) -> Reconstructor:
    """The backend called ``name``, built with ``opts`` (its constructor's keyword arguments).

    Raises:
        ValueError: Unknown backend name.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown reconstruction backend {name!r}; expected one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**opts)


def write_mesh(mesh: trimesh.Trimesh, path: Path) -> Path:
    """Check ``mesh`` and write it as binary PLY (with vertex colours) atomically."""
    check_mesh(mesh, path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(mesh.export(file_type="ply"))
    return path


def pose_floats(obj_to_cam: np.ndarray) -> tuple[float, ...]:
    """A 4x4 pose as the 16 row-major floats stored in results and manifests."""
    return tuple(float(x) for x in np.asarray(obj_to_cam, dtype=np.float64).reshape(16))


class PerSampleReconstructor(ABC):
    """A backend that handles one sample at a time in this process (depth, oracle)."""

    name: str

    @abstractmethod
    def build(self, sample: SampleRef) -> tuple[trimesh.Trimesh, np.ndarray]:
        """Mesh in the object frame and the object-to-camera pose of one sample.

        Raises:
            BadSample: The sample's inputs cannot be used.
        """

    @abstractmethod
    def provenance(self) -> dict[str, Any]: ...

    def reconstruct(self, samples: Sequence[SampleRef], out_dir: Path) -> list[ReconResult]:
        """Build and write each sample's mesh; a bad sample becomes a failed result, the rest go on."""
        results = []
        for sample in samples:
            mesh_path = Path(out_dir) / f"{sample.sample_id}.ply"
            try:
                mesh, obj_to_cam = self.build(sample)
                write_mesh(mesh, mesh_path)
            except BadSample as exc:
                results.append(ReconResult.failure(sample.sample_id, exc.path, exc.reason))
                continue
            results.append(ReconResult(sample.sample_id, True, mesh_path, pose_floats(obj_to_cam)))
        return results
