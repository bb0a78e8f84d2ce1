"""The two grids: same field of view, voxel centres where the module says, lookup by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthbrain.errors import ConfigError
from synthbrain.grids import DEMO, FULL, GRIDS, Grid, get_grid

# voxel edges (mm, RAS) of the field of view, as documented in synthbrain.grids
FOV = np.array([[-80.5, 79.5], [-129.5, 94.5], [-76.5, 83.5]])


def _edges(grid: Grid) -> np.ndarray:
    """(3, 2) world mm of the outer voxel edges: the centres of voxels -0.5 and shape - 0.5."""
    corners = np.array([[-0.5] * 3, np.array(grid.shape) - 0.5])
    return (np.c_[corners, np.ones(2)] @ grid.affine.T)[:, :3].T


@pytest.mark.parametrize("grid", [DEMO, FULL], ids=lambda g: g.name)
def test_grid_spans_the_documented_field_of_view(grid):
    np.testing.assert_allclose(_edges(grid), FOV)


def test_demo_and_full_share_the_field_of_view_at_half_resolution():
    np.testing.assert_array_equal(_edges(DEMO), _edges(FULL))
    assert DEMO.spacing == 2 * FULL.spacing
    assert tuple(2 * n for n in DEMO.shape) == FULL.shape


def test_field_of_view_holds_the_whole_mni_brain_mask():
    from nilearn.datasets import load_mni152_brain_mask

    mask = load_mni152_brain_mask(resolution=1)
    ijk = np.argwhere(mask.get_fdata() > 0)
    xyz = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    # every 1 mm mask voxel, edges included (the top of the brain is within 2 mm of the top edge)
    assert np.all(xyz.min(axis=0) - 0.5 >= FOV[:, 0])
    assert np.all(xyz.max(axis=0) + 0.5 <= FOV[:, 1])


def test_full_voxel_centres_fall_on_whole_millimetres():
    # so the 1 mm MNI152 template lands on the grid without interpolation
    centres = FULL.voxel_to_world(np.array([[0, 0, 0], [1, 2, 3], [159, 223, 159]]))
    np.testing.assert_array_equal(centres, np.round(centres))
    origin = FULL.world_to_voxel(np.zeros((1, 3)))[0]
    np.testing.assert_array_equal(origin, np.round(origin))  # the MNI origin is a voxel centre
    assert np.all((origin >= 0) & (origin < FULL.shape))


@pytest.mark.parametrize("ijk", [(0, 0, 0), (17, 55, 40), (79, 111, 79)])
def test_demo_voxel_centre_lies_midway_between_two_full_voxel_centres(ijk):
    i = np.array(ijk)
    full_pair = FULL.voxel_to_world(np.stack([2 * i, 2 * i + 1]))
    np.testing.assert_allclose(DEMO.voxel_to_world(i[None])[0], full_pair.mean(axis=0))


@pytest.mark.parametrize("grid", [DEMO, FULL], ids=lambda g: g.name)
def test_affine_agrees_with_voxel_world_conversions(grid):
    ijk = np.array([[0.0, 0, 0], [3, 7, 11], [grid.shape[0] - 1, 0.5, 2.25]])
    xyz = grid.voxel_to_world(ijk)
    np.testing.assert_allclose(np.c_[ijk, np.ones(3)] @ grid.affine.T, np.c_[xyz, np.ones(3)])
    np.testing.assert_allclose(grid.world_to_voxel(xyz), ijk)
    np.testing.assert_array_equal(grid.affine[:3, 3], grid.origin)
    np.testing.assert_array_equal(np.diag(grid.affine)[:3], [grid.spacing] * 3)  # RAS+: positive axes


@pytest.mark.parametrize("grid, res, voxel_ml", [(DEMO, "2", 0.008), (FULL, "1", 0.001)],
                         ids=["demo", "full"])
def test_bids_resolution_label_and_voxel_volume(grid, res, voxel_ml):
    assert grid.res_label == res
    assert grid.voxel_volume_ml == pytest.approx(voxel_ml)


@pytest.mark.parametrize("grid", [DEMO, FULL], ids=lambda g: g.name)
def test_dict_round_trip_through_json(grid):
    d = json.loads(json.dumps(grid.to_dict()))
    assert d["space"] == "MNI152NLin2009aSym"
    assert Grid.from_dict(d) == grid


@pytest.mark.parametrize("name, grid", [("demo", DEMO), ("full", FULL), (DEMO, DEMO)],
                         ids=["demo", "full", "Grid"])
def test_get_grid(name, grid):
    assert get_grid(name) is grid


@pytest.mark.parametrize("name", ["medium", "", "res-2", "DEMO "])
def test_get_grid_refuses_unknown_names_and_lists_the_known_ones(name):
    with pytest.raises(ConfigError) as err:
        get_grid(name)
    message = str(err.value)
    assert repr(name) in message
    assert all(known in message for known in GRIDS)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"shape": (80, 112)}, "shape"),
    ({"shape": (80, 112, 4)}, "shape"),
    ({"spacing": 0.0}, "spacing"),
    ({"spacing": -2.0}, "spacing"),
], ids=["2 sizes", "size 4", "spacing 0", "negative spacing"])
def test_grid_validates_its_fields(kwargs, fragment):
    fields = {"name": "bad", "shape": (80, 112, 80), "spacing": 2.0, "origin": (0.0, 0.0, 0.0)} | kwargs
    with pytest.raises(ConfigError, match=fragment):
        Grid(**fields)
