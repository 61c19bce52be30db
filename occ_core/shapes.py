"""Procedural meshes for the synthetic ObMan: one shape family per QA class, and a crude hand occluder.

The class lives in the **shape** (bottle = body, shoulder and neck; bowl = open shell; knife = tapered
blade and handle; ...); size proportions, colours and surface pattern are drawn at random from the same
distributions for every class, so colour alone never gives the class away. Class meshes come out in
ShapeNet's normalised frame (+Y up, bounding box centred, unit diagonal) with colours baked as vertex
colours; every part is a closed surface, so the mesh is watertight. The hand is metric (metres), built
in a hand frame (palm centre at the origin, fingers along +Y, palm facing +Z), each part carrying its
ObMan segmentation label.

Preview one mesh per class (writes OBJ files):

    python -m occ_core.shapes --out /tmp/shapes --seed 0
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import click
import numpy as np
import trimesh

from occ_core.classes import QA_CLASSES
from occ_core.obman import FOREARM_LABEL, HAND_LABELS

PALM_LABEL, INDEX_LABEL = HAND_LABELS
# Joint order of ObMan's coords_3d: root, then thumb, index, middle, ring, pinky, each base to tip.
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
_RESOLUTION = 0.02  # longest profile step, in normalised units: dense enough for painted patterns


# --- primitives -----------------------------------------------------------------------------------


def _resample(profile: np.ndarray, step: float) -> np.ndarray:
    """Insert points along a polyline so that no segment is longer than ``step``."""
    points = [profile[0]]
    for a, b in zip(profile[:-1], profile[1:], strict=True):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        points.extend(a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:])
    return np.asarray(points)


def revolved(profile: list[tuple[float, float]], sections: int = 48) -> trimesh.Trimesh:
    """Closed surface of revolution about +Y of a (radius, height) profile starting and ending on the axis."""
    line = _resample(np.asarray(profile, dtype=np.float64), _RESOLUTION)
    mesh = trimesh.creation.revolve(line, sections=sections)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # +Z up -> +Y up
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def superellipsoid(
    extents: tuple[float, float, float], exponent: float, subdivisions: int = 4
) -> trimesh.Trimesh:
    """A closed rounded box (small exponent) to ellipsoid (exponent 1) with the given full extents.

    Built by pushing each icosphere vertex along its direction onto the surface
    ``sum |x_i / a_i| ** (2 / exponent) = 1``, so the topology (and watertightness) is the sphere's.
    """
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    directions = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    half = np.asarray(extents, dtype=np.float64) / 2.0
    power = 2.0 / exponent
    radius = np.sum(np.abs(directions / half) ** power, axis=1) ** (-1.0 / power)
    return trimesh.Trimesh(directions * radius[:, None], sphere.faces.copy(), process=False)


def prism(outline: np.ndarray, thickness: float, rings: int = 5) -> trimesh.Trimesh:
    """A closed slab: a convex counter-clockwise (x, y) outline extruded over ``thickness`` along Z.

    Each cap is a set of shrinking copies of the outline around its centre, so that the flat faces
    have vertices inside them too (for painted patterns).
    """
    ring = _resample(np.vstack([outline, outline[:1]]), _RESOLUTION * 2)[:-1]
    n = len(ring)
    centre = ring.mean(axis=0)
    levels = np.linspace(1.0, 0.0, rings + 1)[:-1]
    cap = np.vstack([centre + (ring - centre) * level for level in levels] + [centre[None]])
    cap_faces = []
    for k in range(rings - 1):
        for i in range(n):
            a, b = k * n + i, k * n + (i + 1) % n
            c, d = a + n, b + n
            cap_faces += [(a, b, d), (a, d, c)]
    tip = rings * n
    inner = (rings - 1) * n
    cap_faces += [(inner + i, inner + (i + 1) % n, tip) for i in range(n)]
    cap_faces = np.asarray(cap_faces)
    count = len(cap)
    top = np.column_stack([cap, np.full(count, thickness / 2)])
    bottom = np.column_stack([cap, np.full(count, -thickness / 2)])
    sides = []
    for i in range(n):
        j = (i + 1) % n
        sides += [(i, count + i, count + j), (i, count + j, j)]
    faces = np.vstack([cap_faces, cap_faces[:, ::-1] + count, np.asarray(sides)])
    mesh = trimesh.Trimesh(np.vstack([top, bottom]), faces, process=False)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def rounded_rectangle(width: float, height: float, radius: float, corner_points: int = 6) -> np.ndarray:
    """Counter-clockwise outline of a width x height rectangle (centred) with rounded corners."""
    points = []
    corners = ((1, 1, 0.0), (-1, 1, 0.5), (-1, -1, 1.0), (1, -1, 1.5))
    for sx, sy, start in corners:
        cx, cy = sx * (width / 2 - radius), sy * (height / 2 - radius)
        for t in np.linspace(start * np.pi, (start + 0.5) * np.pi, corner_points):
            points.append((cx + radius * np.cos(t), cy + radius * np.sin(t)))
    return np.asarray(points)


def cylinder(radius: float, length: float, axis: str, centre: tuple[float, float, float]) -> trimesh.Trimesh:
    """A closed cylinder along ``axis`` ('x', 'y' or 'z') centred at ``centre``."""
    mesh = trimesh.creation.cylinder(radius=radius, height=length, sections=32)
    if axis == "x":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))
    elif axis == "y":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
    mesh.apply_translation(centre)
    return mesh


def normalise(parts: list[trimesh.Trimesh]) -> list[trimesh.Trimesh]:
    """Move and scale parts together, in place, so that their joint bounding box is centred at the
    origin with a unit diagonal (ShapeNetCore.v2's frame)."""
    lo = np.min([p.bounds[0] for p in parts], axis=0)
    hi = np.max([p.bounds[1] for p in parts], axis=0)
    for part in parts:
        part.apply_translation(-(lo + hi) / 2.0)
        part.apply_scale(1.0 / np.linalg.norm(hi - lo))
    return parts


# --- colour ---------------------------------------------------------------------------------------


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 colour from one distribution shared by every class."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.95), rng.uniform(0.25, 0.95))
    return np.round(np.asarray(rgb) * 255).astype(np.uint8)


def _pattern(kind: str, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Weight in [0, 1] of the second colour at each point (coordinates in about [-0.5, 0.5])."""
    if kind == "plain":
        return np.zeros(len(points))
    if kind == "stripes":
        axis = rng.normal(size=3)
        phase = points @ (axis / np.linalg.norm(axis)) * rng.uniform(6, 18)
        return (np.sin(phase * np.pi) > 0).astype(float)
    if kind == "checker":
        cells = np.floor(points * rng.uniform(4, 10)).astype(int)
        return (cells.sum(axis=1) % 2).astype(float)
    if kind == "band":
        centre, width = rng.uniform(-0.2, 0.2), rng.uniform(0.1, 0.35)
        return (np.abs(points[:, 1] - centre) < width / 2).astype(float)
    # "noise": a few random plane waves, smooth and blotchy
    waves = rng.normal(size=(4, 3)) * rng.uniform(4, 10)
    field = np.sin(points @ waves.T + rng.uniform(0, 2 * np.pi, 4)).sum(axis=1)
    return np.clip(field / 4 + 0.5, 0, 1)


PATTERNS = ("plain", "stripes", "checker", "band", "noise")


def paint(
    mesh: trimesh.Trimesh, rng: np.random.Generator, colours: tuple[np.ndarray, np.ndarray] | None = None
) -> str:
    """Bake a random two-colour pattern into the vertex colours; returns the pattern's name."""
    first, second = colours if colours is not None else (random_colour(rng), random_colour(rng))
    kind = PATTERNS[rng.integers(len(PATTERNS))]
    weight = _pattern(kind, mesh.vertices, rng)[:, None]
    rgb = np.round(first * (1 - weight) + second * weight).astype(np.uint8)
    mesh.visual.vertex_colors = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    return kind


def _solid(mesh: trimesh.Trimesh, colour: np.ndarray) -> trimesh.Trimesh:
    mesh.visual.vertex_colors = np.append(colour, 255).astype(np.uint8)
    return mesh


# --- the 8 classes (proportions in units of the object's height or length) ------------------------


def _bottle(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    r = rng.uniform(0.14, 0.22)
    body, shoulder = rng.uniform(0.5, 0.62), rng.uniform(0.1, 0.18)
    neck_r, top = r * rng.uniform(0.28, 0.4), 1.0
    profile = [(0.0, 0.0), (r * 0.92, 0.0), (r, 0.03), (r, body)]
    # rounded shoulder: a quarter ellipse from the body radius down to the neck
    for t in np.linspace(0, np.pi / 2, 8)[1:]:
        profile.append((neck_r + (r - neck_r) * np.cos(t), body + shoulder * np.sin(t)))
    profile += [(neck_r, top - 0.04), (neck_r * 1.18, top - 0.035), (neck_r * 1.18, top), (0.0, top)]
    return [revolved(profile)]


def _can(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    r = rng.uniform(0.28, 0.42)
    rim = 0.03
    profile = [(0.0, 0.0), (r * 0.88, 0.0), (r, rim * 1.5), (r, 1 - rim * 1.5), (r * 0.88, 1.0), (0.0, 1.0)]
    return [revolved(profile)]


def _jar(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    r = rng.uniform(0.36, 0.55)
    neck_r = r * rng.uniform(0.68, 0.85)
    body = rng.uniform(0.62, 0.75)
    profile = [(0.0, 0.0), (r * 0.9, 0.0), (r, 0.06), (r, body)]
    for t in np.linspace(0, np.pi / 2, 6)[1:]:
        profile.append((neck_r + (r - neck_r) * np.cos(t), body + 0.12 * np.sin(t)))
    profile += [(neck_r, body + 0.14), (0.0, body + 0.14)]
    lid_r = neck_r * 1.06
    lid = [(0.0, body + 0.13), (lid_r, body + 0.13), (lid_r, 0.98), (lid_r * 0.95, 1.0), (0.0, 1.0)]
    return [revolved(profile), revolved(lid)]


def _bowl(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    height = rng.uniform(0.38, 0.6)  # relative to the radius 1
    wall = rng.uniform(0.04, 0.07)
    foot_r = rng.uniform(0.3, 0.45)
    profile = [(0.0, 0.0), (foot_r, 0.0), (foot_r, 0.05)]
    # outer wall from the foot up to the rim, then the inner wall back down to the centre
    for t in np.linspace(0.0, 1.0, 12)[1:]:
        profile.append((foot_r + (1 - foot_r) * np.sin(t * np.pi / 2), 0.05 + (height - 0.05) * t**1.5))
    inner_top = 1 - wall
    for t in np.linspace(1.0, 0.0, 12):
        profile.append(
            (inner_top * np.sin(t * np.pi / 2) ** 0.8, wall + 0.05 + (height - wall - 0.05) * t**2)
        )
    profile.append((0.0, wall + 0.05))
    return [revolved(profile, sections=64)]


def _knife(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    blade_len, handle_len = rng.uniform(0.55, 0.65), rng.uniform(0.3, 0.38)
    width = rng.uniform(0.08, 0.13)
    # Spine straight along the top; the cutting edge runs straight, then rises in an arc to the tip.
    start = blade_len * rng.uniform(0.2, 0.55)
    arc = np.linspace(0.0, np.pi / 2, 10)
    edge = np.column_stack([start + (blade_len - start) * np.sin(arc), width / 2 - width * np.cos(arc)])
    outline = np.vstack([[(0.0, -width / 2)], edge, [(0.0, width / 2)]])
    blade = prism(outline, 0.012)
    handle = superellipsoid((handle_len, width * rng.uniform(0.8, 1.05), width * 0.45), 0.5)
    handle.apply_translation((-handle_len / 2 + 0.01, -width * 0.05, 0))
    return [blade, handle]


def _cellphone(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    width, thickness = rng.uniform(0.45, 0.55), rng.uniform(0.05, 0.08)
    body = prism(rounded_rectangle(width, 1.0, width * rng.uniform(0.08, 0.2)), thickness)
    screen = prism(rounded_rectangle(width * 0.88, 0.86, width * 0.04), thickness * 0.2)
    screen.apply_translation((0, 0, thickness * 0.45))
    return [body, screen]


def _remote(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    width, thickness = rng.uniform(0.2, 0.28), rng.uniform(0.06, 0.1)
    body = prism(rounded_rectangle(width, 1.0, width * rng.uniform(0.2, 0.45)), thickness)
    parts = [body]
    rows, columns = int(rng.integers(4, 8)), 3
    button_r = width / 10
    for i in range(rows):
        for j in range(columns):
            y = 0.3 - i * 0.09
            x = (j - 1) * width * 0.27
            parts.append(cylinder(button_r, thickness * 0.5, "z", (x, y, thickness * 0.45)))
    parts.append(cylinder(button_r * 1.6, thickness * 0.5, "z", (0, 0.4, thickness * 0.45)))
    return parts


def _camera(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    height, depth = rng.uniform(0.55, 0.72), rng.uniform(0.3, 0.45)
    body = superellipsoid((1.0, height, depth), rng.uniform(0.15, 0.3))
    lens_r = height * rng.uniform(0.28, 0.38)
    lens_len = rng.uniform(0.2, 0.45)
    lens = cylinder(lens_r, lens_len, "z", (rng.uniform(-0.1, 0.1), -0.02, depth / 2 + lens_len / 2 - 0.02))
    glass = cylinder(lens_r * 0.7, 0.02, "z", (lens.centroid[0], -0.02, depth / 2 + lens_len - 0.015))
    finder = superellipsoid((0.3, 0.12, depth * 0.7), 0.3)
    finder.apply_translation((-0.2, height / 2 + 0.04, 0))
    shutter = cylinder(0.05, 0.06, "y", (0.3, height / 2 + 0.02, 0))
    return [body, lens, glass, finder, shutter]


_BUILDERS: dict[str, Callable[[np.random.Generator], list[trimesh.Trimesh]]] = {
    "bottle": _bottle,
    "bowl": _bowl,
    "can": _can,
    "jar": _jar,
    "knife": _knife,
    "cellphone": _cellphone,
    "camera": _camera,
    "remote": _remote,
}


def class_mesh(class_name: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """A random instance of a QA class: normalised, watertight parts, colours baked per vertex.

    The first part (the body) gets a random two-colour pattern; the detail parts (lid, screen, lens,
    buttons, handle) each get a solid random colour.

    Args:
        class_name: One of occ_core.classes.QA_CLASSES.
        rng: Source of every random choice (proportions, colours, pattern).
    Returns:
        A trimesh in ShapeNet's normalised frame (+Y up, centred bounding box, unit diagonal).
    """
    if class_name not in _BUILDERS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(QA_CLASSES)}")
    # Normalise before painting so that pattern frequencies are in the same units for every class.
    body, *details = normalise(_BUILDERS[class_name](rng))
    paint(body, rng)
    for part in details:
        _solid(part, random_colour(rng))
    return trimesh.util.concatenate([body, *details])


# --- the hand -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandPart:
    """One closed piece of the hand occluder and its ObMan segmentation label."""

    mesh: trimesh.Trimesh
    label: int


@dataclass(frozen=True)
class Hand:
    """A crude right hand: palm, five finger capsules and a forearm, plus its 21 joints (ObMan order)."""

    parts: tuple[HandPart, ...]
    joints: np.ndarray  # (21, 3)

    def meshes_by_label(self) -> dict[int, trimesh.Trimesh]:
        """One mesh per segmentation label (the parts sharing a label, concatenated)."""
        labels = sorted({p.label for p in self.parts})
        return {
            label: trimesh.util.concatenate([p.mesh for p in self.parts if p.label == label])
            for label in labels
        }

    def surface_points(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` points spread over the hand without the forearm (MANO has none), area-weighted."""
        mesh = trimesh.util.concatenate([p.mesh for p in self.parts if p.label != FOREARM_LABEL])
        areas = mesh.area_faces
        faces = rng.choice(len(areas), size=count, p=areas / areas.sum())
        barycentric = rng.dirichlet(np.ones(3), size=count)
        triangles = mesh.triangles[faces]
        return np.einsum("ij,ijk->ik", barycentric, triangles)


@lru_cache(maxsize=1)
def _unit_sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=2)


def _capsule(start: np.ndarray, direction: np.ndarray, length: float, radius: float) -> trimesh.Trimesh:
    """A capsule whose axis runs from ``start`` for ``length`` along ``direction``.

    A sphere of ``radius`` whose upper and lower halves are pulled apart along Z (faces crossing the
    equator become the cylinder), then turned onto ``direction``: closed, and far cheaper to build
    than a revolved profile.
    """
    sphere = _unit_sphere()
    vertices = sphere.vertices * radius
    vertices[:, 2] += np.where(sphere.vertices[:, 2] >= 0, 1.0, -1.0) * max(length / 2 - radius, 0.0)
    matrix = trimesh.geometry.align_vectors([0, 0, 1], direction)
    matrix[:3, 3] = start + direction * length / 2
    return trimesh.Trimesh(trimesh.transform_points(vertices, matrix), sphere.faces.copy(), process=False)


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0.02, 0.09)
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95))
    return np.round(np.asarray(rgb) * 255).astype(np.uint8)


def hand_occluder(rng: np.random.Generator) -> Hand:
    """A random crude right hand in its own frame (metres, palm centre at the origin).

    Palm and thumb, middle, ring and pinky are labelled 22 (right hand), the index finger 24, the
    forearm 20. Each finger curls towards -Z by its own random angle; the forearm leaves the wrist
    along -Y and recedes towards -Z (away from a camera that the palm faces).
    """
    size = rng.uniform(0.9, 1.2)
    skin = _skin_colour(rng)
    palm_w, palm_l = 0.085 * size, 0.09 * size
    parts = [HandPart(_solid(superellipsoid((palm_w, palm_l, 0.03 * size), 0.6, 3), skin), PALM_LABEL)]
    joints = [np.array([0.0, -palm_l / 2, 0.0])]

    def finger(base: np.ndarray, direction: np.ndarray, length: float, label: int) -> None:
        direction = direction / np.linalg.norm(direction)
        parts.append(HandPart(_solid(_capsule(base, direction, length, 0.0085 * size), skin), label))
        joints.extend(base + direction * length * f for f in (0.0, 0.4, 0.7, 1.0))

    thumb_angle = rng.uniform(0.5, 1.1)
    finger(
        np.array([palm_w * 0.45, -palm_l * 0.2, 0.0]),
        np.array([np.sin(thumb_angle), np.cos(thumb_angle), -rng.uniform(0.0, 0.6)]),
        0.062 * size,
        PALM_LABEL,
    )
    for name, x, length in zip(
        FINGERS[1:], (0.36, 0.12, -0.12, -0.36), (0.075, 0.082, 0.077, 0.062), strict=True
    ):
        curl = rng.uniform(0.0, 1.2)
        spread = rng.normal(0, 0.08) + x * 0.3
        direction = np.array([np.sin(spread), np.cos(curl) * np.cos(spread), -np.sin(curl)])
        label = INDEX_LABEL if name == "index" else PALM_LABEL
        finger(np.array([x * palm_w, palm_l * 0.45, 0.0]), direction, length * size, label)
    wrist = joints[0]
    forearm = _capsule(
        wrist + np.array([0, 0.01, 0]), np.array([0.0, -1.0, -rng.uniform(0.2, 0.8)]), 0.3, 0.028 * size
    )
    parts.append(HandPart(_solid(forearm, skin), FOREARM_LABEL))
    return Hand(tuple(parts), np.asarray(joints))


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the OBJ files.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
def cli(out: Path, seed: int) -> None:
    """Write one random mesh per class and one hand as OBJ files, to look at."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in QA_CLASSES:
        mesh = class_mesh(name, rng)
        mesh.export(out / f"{name}.obj")
        click.echo(f"{name}: {len(mesh.vertices)} vertices, watertight={mesh.is_watertight}")
    hand = hand_occluder(rng)
    trimesh.util.concatenate([p.mesh for p in hand.parts]).export(out / "hand.obj")


if __name__ == "__main__":
    cli()
