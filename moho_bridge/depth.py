"""``depth`` backend: a geometric fallback mesh from the depth map, for when MOHO is not installed.

It is not MOHO and never reported as MOHO: it has no learned shape prior. Per sample:

1. Visible object pixels: segm channel 0 == 100 (the modal mask, fair to use; the amodal channel 2
   would leak ground truth and is left to the ``oracle`` backend). Their depth (channel 0, decoded
   with the configured PNG direction) is back-projected to camera-frame points.
2. Mirror completion: each point is reflected, along its own viewing ray, through a plane through the
   object's centre facing the camera; this invents the back under a front-back symmetry assumption.
   The object's centre is the translation of the ground-truth pose.
3. Hull, carved by free space: the convex hull of the points and their mirror images gives, per pixel
   ray, an entry and an exit distance. It fills pixels the hand hides (segm channel 0 shows a hand or
   arm label there), never pixels where the background is seen, since the object cannot be there.
4. The surface is a closed pixel-grid mesh over the filled pixels: the front at the measured depth
   (hull entry where hidden), the back at the hull exit, walls along the outline; vertices are
   coloured from ``rgb`` (hidden pixels take their nearest visible pixel's colour).
5. The mesh is moved into the object frame with the inverse of the ground-truth pose
   ``object_to_camera(meta)``: the same privilege MOHO's OCC setup uses (it renders from the ground-
   truth pose too). The manifest's provenance says so.

So view 0 shows the visible object as photographed, with the hand's part filled, and orbit views show
a plausible solid. Wrong for concave objects (a bowl's inside) and for hidden parts beyond the hull.

    occ reconstruct --root ROOT --split test --backend depth --out OUT
"""

from __future__ import annotations

from typing import Any

import numpy as np
import trimesh
from scipy.ndimage import distance_transform_edt
from scipy.spatial import ConvexHull, QhullError

from moho_bridge.protocol import PerSampleReconstructor
from occ_core.config import get_settings
from occ_core.errors import BadSample
from occ_core.obman import (
    OBJECT_LABEL,
    K,
    SampleRef,
    backproject,
    load_meta,
    object_to_camera,
    read_depth,
    read_rgb,
    read_segm,
)

COMPLETION = (
    "mirror through a plane at the object centre facing the camera (along each pixel ray), convex hull "
    "of the visible points and their mirror images, carved to the visible and hand-occluded pixels"
)
# Fewer visible pixels than this cannot make a meaningful hull.
MIN_VISIBLE_PIXELS = 16
# Rays per block when intersecting pixel rays with the hull (bounds memory to block x facets).
RAY_BLOCK = 4096
# Qhull merges facets closer than this (metres): far below the depth PNG's 8-bit step, and it cuts the
# facet count, hence the ray-hull work, several times.
HULL_MERGE_M = 5e-4
# |ray . facet normal| below this counts as a ray parallel to the facet (unit vectors, metres).
PARALLEL_TOLERANCE = 1e-9
# K with the principal point moved by half a pixel: the readers sample pixel (i, j) at its centre
# (i + 0.5, j + 0.5) (occ_core.obman.pixel_rays), so with this K they sample its top-left corner.
K_CORNERS = K + np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])


def unit_rays(mask: np.ndarray, camera: np.ndarray = K) -> np.ndarray:
    """(N, 3) unit viewing rays of the ``mask`` pixels, row-major, as occ_core.obman samples pixels."""
    return backproject(np.ones(mask.shape, np.float32), mask, camera, depth_kind="radial")


def hull_interval(hull: ConvexHull, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances along unit ``rays`` (from the camera centre) where each enters and leaves the hull.

    Returns:
        (entry, exit); a ray that misses the hull has entry > exit.
    """
    normals, offsets = hull.equations[:, :3], hull.equations[:, 3]
    entry, exit_ = np.empty(len(rays)), np.empty(len(rays))
    for start in range(0, len(rays), RAY_BLOCK):
        facing = rays[start : start + RAY_BLOCK] @ normals.T  # inside: facing * t + offset <= 0
        # A point and its mirror image lie on one ray, so the hull's outline facets contain rays through
        # the camera: there facing and offset are both rounding noise, and the facet bounds nothing.
        grazing = np.abs(facing) < PARALLEL_TOLERANCE
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = -offsets / facing
        misses = (grazing & (offsets > PARALLEL_TOLERANCE)).any(axis=1)
        entry[start : start + RAY_BLOCK] = np.where(~grazing & (facing < 0), bound, -np.inf).max(axis=1)
        exit_[start : start + RAY_BLOCK] = np.where(~grazing & (facing > 0), bound, np.inf).min(axis=1)
        entry[start : start + RAY_BLOCK][misses] = np.inf
    return entry, exit_


def mirror_hull(points: np.ndarray, centre: np.ndarray) -> ConvexHull:
    """Convex hull of ``points`` and their mirror images through the plane at ``centre`` facing the camera.

    Each point is reflected along its own viewing ray, so its image projects onto the same pixel.

    Raises:
        QhullError: The points and their images span no volume.
    """
    normal = centre / np.linalg.norm(centre)
    distance = np.linalg.norm(points, axis=1)
    rays = points / distance[:, None]
    to_plane = (centre @ normal) / (rays @ normal)
    mirrored = rays * np.maximum(2.0 * to_plane - distance, 1e-6)[:, None]
    return ConvexHull(np.concatenate([points, mirrored]), qhull_options=f"C{HULL_MERGE_M}")


def _corner_mean(values: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Mean over the filled pixels around each pixel corner: (H, W, C) -> (H+1, W+1, C); NaN if none."""
    height, width = filled.shape
    padded = np.zeros((height + 2, width + 2, values.shape[2]))
    weight = np.zeros((height + 2, width + 2, 1))
    padded[1:-1, 1:-1][filled] = values[filled]
    weight[1:-1, 1:-1, 0] = filled
    total = padded[:-1, :-1] + padded[:-1, 1:] + padded[1:, :-1] + padded[1:, 1:]
    count = weight[:-1, :-1] + weight[:-1, 1:] + weight[1:, :-1] + weight[1:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def grid_mesh(
    front: np.ndarray, back: np.ndarray, colours: np.ndarray, filled: np.ndarray
) -> trimesh.Trimesh:
    """Closed mesh over the ``filled`` pixels: a front and a back surface joined by walls at the outline.

    Each filled pixel is a square between its corners, so the mesh covers exactly the filled pixels in
    the input view.

    Args:
        front: (H, W) distance of the front surface along each pixel ray (radial), valid where filled.
        back: (H, W) distance of the back surface, valid where filled.
        colours: (H, W, 3) uint8 colour per pixel.
        filled: (H, W) bool, the pixels the object covers.
    Returns:
        The mesh in the camera frame, with per-vertex colours, outward-facing.
    """
    per_pixel = np.dstack([front, back, colours.astype(np.float64)])
    corner_values = _corner_mean(per_pixel, filled)
    corners = np.isfinite(corner_values[:, :, 0])
    rays = unit_rays(corners, K_CORNERS)
    values = corner_values[corners]
    vertices = np.concatenate([rays * values[:, :1], rays * values[:, 1:2]])
    rgb = np.clip(np.rint(values[:, 2:5]), 0, 255).astype(np.uint8)
    rgba = np.concatenate([np.concatenate([rgb, rgb]), np.full((len(vertices), 1), 255, np.uint8)], axis=1)

    index = np.full(corners.shape, -1)
    index[corners] = np.arange(corners.sum())
    count = int(corners.sum())
    rows, cols = np.nonzero(filled)
    # Corners of each filled pixel, clockwise on screen: top-left, top-right, bottom-right, bottom-left.
    a, b = index[rows, cols], index[rows, cols + 1]
    c, d = index[rows + 1, cols + 1], index[rows + 1, cols]
    faces = [
        np.stack([a, c, b], 1),  # front, facing the camera
        np.stack([a, d, c], 1),
        np.stack([a, b, c], 1) + count,  # back, facing away
        np.stack([a, c, d], 1) + count,
    ]
    padded = np.pad(filled, 1)
    sides = (  # (neighbour offset, first corner, second corner): the edge shared with that neighbour
        ((-1, 0), a, b),
        ((0, 1), b, c),
        ((1, 0), c, d),
        ((0, -1), d, a),
    )
    for (dr, dc), p, q in sides:
        outline = ~padded[rows + 1 + dr, cols + 1 + dc]
        p, q = p[outline], q[outline]
        faces += [np.stack([p, q, q + count], 1), np.stack([p, q + count, p + count], 1)]
    return trimesh.Trimesh(vertices, np.concatenate(faces), vertex_colors=rgba, process=False)


def complete_object(
    depth: np.ndarray,
    visible: np.ndarray,
    occluded: np.ndarray,
    rgb: np.ndarray,
    centre: np.ndarray,
    depth_kind: str = "radial",
) -> trimesh.Trimesh:
    """Closed, coloured camera-frame mesh of an object seen in ``visible`` pixels, partly hidden in
    ``occluded``.

    Args:
        depth: (H, W) depth of the full scene in metres (NaN where nothing).
        visible: (H, W) bool, pixels where the object is seen (and has depth).
        occluded: (H, W) bool, pixels where something in front (hand, arm) may hide the object.
        rgb: (H, W, 3) uint8 input image.
        centre: (3,) object centre in the camera frame (mirror plane position).
        depth_kind: ``radial`` or ``planar`` (see occ_core.obman.backproject).
    Raises:
        QhullError: The visible points span no volume.
    """
    points = backproject(depth, visible, K, depth_kind=depth_kind)
    hull = mirror_hull(points, centre)
    rows, cols = np.nonzero(visible)
    window = np.zeros_like(visible)
    window[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True  # the hull projects inside
    candidates = (visible | occluded) & window
    entry, exit_ = hull_interval(hull, unit_rays(candidates))
    front, back = np.full(depth.shape, np.nan), np.full(depth.shape, np.nan)
    front[candidates], back[candidates] = entry, exit_
    measured = np.linalg.norm(points, axis=1)
    front[visible] = measured
    back[visible] = np.maximum(back[visible], measured)
    filled = visible | (candidates & (front <= back))
    # Hidden pixels show the hand in rgb: colour them like the nearest visible object pixel.
    _, (near_r, near_c) = distance_transform_edt(~visible, return_indices=True)
    return grid_mesh(front, back, rgb[near_r, near_c], filled)


class DepthReconstructor(PerSampleReconstructor):
    """The ``depth`` backend (see the module docstring)."""

    name = "depth"

    def __init__(self, depth_convention: str | None = None) -> None:
        """Args:
        depth_convention: ObMan depth PNG direction, ``writer`` or ``reader``; None takes
            ``OCC_DEPTH_CONVENTION`` (settings).
        """
        self.depth_convention = depth_convention or get_settings().depth_convention

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": "depth",
            "label": "geometric fallback from the depth map; not MOHO",
            "mask": "segm channel 0 == 100 (visible object pixels); other non-zero labels may hide it",
            "completion": COMPLETION,
            "pose": "ground-truth object_to_camera(meta), the same privilege MOHO's OCC setup uses",
            "depth_convention": self.depth_convention,
        }

    def build(self, sample: SampleRef) -> tuple[trimesh.Trimesh, np.ndarray]:
        meta = load_meta(sample.meta_path)
        obj_to_cam = object_to_camera(meta)
        depth = read_depth(sample.depth_path, meta, self.depth_convention)[:, :, 0]
        labels = read_segm(sample.segm_path)[:, :, 0]
        rgb = read_rgb(sample.rgb_path)
        if not labels.shape == depth.shape == rgb.shape[:2]:
            raise BadSample(
                sample.depth_path,
                f"image sizes differ: rgb {rgb.shape[:2]}, segm {labels.shape}, depth {depth.shape}",
            )
        visible = (labels == OBJECT_LABEL) & np.isfinite(depth)
        if visible.sum() < MIN_VISIBLE_PIXELS:
            raise BadSample(
                sample.depth_path,
                f"only {int(visible.sum())} visible object pixels have depth (need {MIN_VISIBLE_PIXELS})",
            )
        occluded = (labels != 0) & (labels != OBJECT_LABEL)
        kind = str(meta.get("depth_kind", "radial"))
        try:
            mesh = complete_object(depth, visible, occluded, rgb, obj_to_cam[:3, 3], kind)
        except QhullError as exc:
            raise BadSample(sample.depth_path, f"visible object points span no volume: {exc}") from exc
        mesh.apply_transform(np.linalg.inv(obj_to_cam))
        return mesh, obj_to_cam
