"""Procedural class meshes and the hand occluder.

.venv/bin/python -m pytest tests/unit/test_shapes.py -q
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from occ_core import shapes
from occ_core.classes import QA_CLASSES


@cache  # meshes are only read here; building each once keeps the file fast
def mesh_of(name: str, seed: int = 0):
    return shapes.class_mesh(name, np.random.default_rng(seed))


@pytest.mark.parametrize("name", QA_CLASSES)
def test_each_class_mesh_is_a_closed_consistently_wound_solid(name):
    mesh = mesh_of(name)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0


@pytest.mark.parametrize("name", QA_CLASSES)
def test_each_class_mesh_is_in_shapenets_normalised_frame(name):
    lo, hi = mesh_of(name).bounds
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)
    assert np.linalg.norm(hi - lo) == pytest.approx(1.0)


@pytest.mark.parametrize("name", QA_CLASSES)
def test_each_class_mesh_carries_opaque_vertex_colours(name):
    mesh = mesh_of(name)
    colours = mesh.visual.vertex_colors
    assert colours.shape == (len(mesh.vertices), 4) and colours.dtype == np.uint8
    assert (colours[:, 3] == 255).all()


def test_a_seed_gives_the_same_mesh_and_another_seed_another():
    a, b, c = (shapes.class_mesh("jar", np.random.default_rng(seed)) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.visual.vertex_colors, b.visual.vertex_colors)
    assert not np.array_equal(a.visual.vertex_colors, c.visual.vertex_colors)


def _sorted_extents(name: str, seed: int) -> np.ndarray:
    return np.sort(mesh_of(name, seed).extents)[::-1]  # longest first


@pytest.mark.parametrize("seed", range(3))
def test_the_class_lives_in_the_proportions(seed):
    extents = {n: _sorted_extents(n, seed) for n in QA_CLASSES}
    assert extents["knife"][0] / extents["knife"][1] > 2.5  # long and narrow
    assert extents["knife"][2] < 0.1 * extents["knife"][0]  # and flat
    assert extents["cellphone"][2] < 0.1 * extents["cellphone"][0]  # a thin slab
    assert extents["remote"][0] / extents["remote"][1] > 2.5  # a long bar
    bowl = mesh_of("bowl", seed).extents
    assert bowl[1] < 0.7 * bowl[0]  # lower (along +Y, up) than wide
    bottle = mesh_of("bottle", seed).extents
    assert bottle[1] > 2 * bottle[0]  # taller than wide


@pytest.mark.parametrize("name", QA_CLASSES)
def test_colour_varies_within_a_class(name):
    # Colours are drawn from one distribution for every class; what a test can see cheaply is that a
    # class has no colour of its own.
    means = [mesh_of(name, seed).visual.vertex_colors[:, :3].mean(axis=0) for seed in range(3)]
    assert min(np.abs(a - b).max() for a, b in [(means[0], means[1]), (means[1], means[2])]) > 10


def test_an_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown class 'mug'"):
        mesh_of("mug")


def test_prism_of_a_convex_outline_is_closed():
    mesh = shapes.prism(shapes.rounded_rectangle(0.5, 1.0, 0.1), 0.05)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    np.testing.assert_allclose(mesh.extents, [0.5, 1.0, 0.05], atol=1e-9)


def test_the_hand_has_palm_index_and_forearm_labels_and_21_joints():
    hand = shapes.hand_occluder(np.random.default_rng(0))
    assert {p.label for p in hand.parts} == {shapes.PALM_LABEL, shapes.INDEX_LABEL, shapes.FOREARM_LABEL}
    assert [p.label for p in hand.parts].count(shapes.INDEX_LABEL) == 1
    assert hand.joints.shape == (21, 3)
    assert all(p.mesh.is_watertight for p in hand.parts)


def test_the_hand_is_hand_sized_in_metres():
    hand = shapes.hand_occluder(np.random.default_rng(1))
    palm_and_fingers = [p.mesh for p in hand.parts if p.label != shapes.FOREARM_LABEL]
    lo = np.min([m.bounds[0] for m in palm_and_fingers], axis=0)
    hi = np.max([m.bounds[1] for m in palm_and_fingers], axis=0)
    assert 0.12 < (hi - lo)[1] < 0.25  # wrist to fingertips


def test_hand_surface_points_leave_out_the_forearm():
    hand = shapes.hand_occluder(np.random.default_rng(2))
    points = hand.surface_points(778, np.random.default_rng(0))
    assert points.shape == (778, 3)
    forearm = next(p.mesh for p in hand.parts if p.label == shapes.FOREARM_LABEL)
    wrist_y = hand.joints[0, 1]
    assert (points[:, 1] > wrist_y - 0.03).all(), "points reach down the forearm"
    assert forearm.bounds[0, 1] < wrist_y - 0.1


def test_hand_meshes_by_label_keep_every_face():
    hand = shapes.hand_occluder(np.random.default_rng(3))
    by_label = hand.meshes_by_label()
    assert sorted(by_label) == [shapes.FOREARM_LABEL, shapes.PALM_LABEL, shapes.INDEX_LABEL]
    assert sum(len(m.faces) for m in by_label.values()) == sum(len(p.mesh.faces) for p in hand.parts)
