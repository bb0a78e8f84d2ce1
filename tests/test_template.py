"""The MNI152 template on the demo grid: tissue maps that add up, ventricles where ventricles are."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from synthbrain.data.template import load_template
from synthbrain.grids import DEMO


@pytest.fixture(scope="module")
def tmpl():
    return load_template("demo")


def test_cached_once_per_grid_whatever_it_is_called(tmpl):
    assert load_template(DEMO) is tmpl


def test_maps_are_on_the_grid_and_fractions_add_up(tmpl):
    for name in ("t1", "gm", "wm", "csf", "brain", "ventricles", "depth"):
        assert getattr(tmpl, name).shape == DEMO.shape, name
    for fraction in (tmpl.gm, tmpl.wm, tmpl.csf, tmpl.brain, tmpl.ventricles):
        assert fraction.min() >= 0.0 and fraction.max() <= 1.0
    assert np.all(tmpl.gm + tmpl.wm + tmpl.csf <= tmpl.brain + 1e-4)
    assert np.all(tmpl.ventricles <= tmpl.csf + 1e-6)
    assert tmpl.t1.min() >= 0.0 and tmpl.t1.max() == 1.0
    t_csf, t_gm, t_wm = tmpl.tissue_intensity
    assert t_csf < t_gm < t_wm  # T1 contrast


def test_volumes_are_those_of_an_adult_brain(tmpl):
    # the MNI152 2009 average is a large adult brain
    assert 1300 < tmpl.brain_volume_ml < 1900
    assert 10 < tmpl.ventricular_volume_ml < 60
    assert tmpl.brain_volume_ml + tmpl.ventricular_volume_ml < tmpl.intracranial_volume_ml


def test_ventricles_lie_deep_near_the_midline_inside_their_region(tmpl):
    vent = tmpl.ventricles > 0.5
    centre = DEMO.voxel_to_world(np.array(ndi.center_of_mass(vent))[None])[0]
    assert abs(centre[0]) < 5.0  # a symmetric template: ventricles straddle x = 0
    assert np.all(tmpl.ventricle_region[vent])
    assert np.median(tmpl.depth[vent]) > 20.0
    assert not (tmpl.ventricle_region & (tmpl.depth == 0)).any()  # never outside the brain
    assert np.all(tmpl.search_mask[tmpl.brain > 0.5])


def test_ventricles_are_the_lateral_and_third_not_the_fissure_or_cisterns(tmpl):
    """The truth of every phantom: the template's lateral ventricles (a mirror pair) and third
    ventricle (on the midline, under the fornix), never the CSF of the interhemispheric fissure above
    the corpus callosum, the cisterns round the splenium or below the third ventricle's floor."""
    from synthbrain.data.template import fissure_mask

    vent = tmpl.ventricles > 0.5
    x, _, z = (DEMO.axis_mm(i).reshape([-1 if j == i else 1 for j in range(3)]) for i in range(3))
    assert tmpl.volume_ml(tmpl.csf * fissure_mask(tmpl.wm > 0.5, DEMO.axis_mm(0))) > 5.0  # fluid there
    assert not (vent & fissure_mask(tmpl.wm > 0.5, DEMO.axis_mm(0))).any()
    assert z[0, 0, np.nonzero(vent.any(axis=(0, 1)))[0]].min() > -14.0  # no fourth ventricle, no basal cistern
    left, right, mid = vent & (x < -4.0), vent & (x > 4.0), vent & (np.abs(x) <= 4.0)
    assert left.sum() == pytest.approx(right.sum(), rel=0.1) and left.sum() > 2 * mid.sum() > 0
    assert 12.0 < tmpl.ventricular_volume_ml < 25.0
