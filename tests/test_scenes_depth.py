"""Scene geometry: nearer objects cover farther ones, visibility counts that occlusion, and shadows
fall away from the key light. Assertions are on geometry and colour classes, never exact pixels."""

import numpy as np
import pytest
import torch

from metacl.scenes.camera import KEY_LIGHT
from metacl.scenes.features import COLOURS, SHAPES, feature_index
from metacl.scenes.layout import _ACROSS, _ALONG, Layout
from metacl.scenes.render import SceneRenderer

BLUE, YELLOW = feature_index("blue"), feature_index("yellow")
RUBBER = feature_index("rubber") - 20


@pytest.fixture(scope="module")
def renderer():
    return SceneRenderer(120, 160)


def one_image(objects):
    """A one-image Layout from (colour, shape index, ground xy) per object, in slot order."""
    present = np.zeros((1, 5), bool)
    colour, shape = np.zeros((1, 5), np.int64), np.zeros((1, 5), np.int64)
    position = np.zeros((1, 5, 2))
    for slot, (c, s, xy) in enumerate(objects):
        present[0, slot], colour[0, slot], shape[0, slot], position[0, slot] = True, c, s, xy
    return Layout(
        present=present,
        colour=colour,
        shape=shape,
        texture=np.full((1, 5), RUBBER),
        rotation=np.zeros((1, 5), np.int64),
        position=position,
        placed=np.ones(1, bool),
    )


def pair(near_first, shape, lateral):
    """A near and a far object one behind the other along the view direction (near: blue)."""
    near = (BLUE, shape, lateral * _ACROSS - 1.4 * _ALONG)
    far = (YELLOW, shape, lateral * _ACROSS + 1.4 * _ALONG)
    return one_image([near, far] if near_first else [far, near]), (0, 1) if near_first else (1, 0)


CASES = [
    (near_first, shape, lateral)
    for near_first in (True, False)
    for shape, lateral in ((SHAPES.index("cube"), 0.0), (SHAPES.index("cylinder"), 1.5), (SHAPES.index("sphere"), -1.5))
]


@pytest.mark.parametrize("near_first, shape, lateral", CASES)
def test_nearer_object_is_painted_over_the_farther_one(renderer, near_first, shape, lateral):
    layout, (near, far) = pair(near_first, shape, lateral)
    depth = renderer.depth(layout.position[0, :2])
    assert depth[near] < depth[far]
    coverage = renderer.coverage(layout)[0].numpy()
    overlap = (coverage[near] > 0.999) & (coverage[far] > 0.999)
    assert overlap.sum() > 100  # the two objects do overlap on screen
    image = renderer.render(layout)[0].numpy().astype(np.float64)[overlap]
    blue, yellow = np.array(COLOURS["blue"], float), np.array(COLOURS["yellow"], float)
    # Every overlap pixel is the near (blue) object's: blue dominates, unlike the yellow far object.
    assert (image[:, 2] > image[:, 0] + 40).all() and (image[:, 2] > image[:, 1] + 40).all()
    assert np.linalg.norm(image.mean(0) - blue) < np.linalg.norm(image.mean(0) - yellow) / 3
    # And the overlap looks exactly as the near object alone would.
    alone = renderer.render(one_image([(BLUE, shape, layout.position[0, near])]))[0].numpy()
    assert np.abs(alone.astype(np.float64)[overlap] - image).max() <= 2


@pytest.mark.parametrize("near_first, shape, lateral", CASES)
def test_visibility_is_what_nearer_objects_leave(renderer, near_first, shape, lateral):
    layout, (near, far) = pair(near_first, shape, lateral)
    coverage = renderer.coverage(layout)[0].double()
    visible = renderer.visibility(layout)[0].double()
    own = coverage.sum(dim=(1, 2))
    left_by_near = (coverage[far] * (1 - coverage[near])).sum()
    assert torch.isclose(visible[near], own[near], rtol=1e-4)  # nothing is in front of it
    assert torch.isclose(visible[far], left_by_near, rtol=1e-4)  # it keeps what the near one leaves
    assert visible[far] < own[far] - 100
    assert (visible[2:] == 0).all()


def ground_darkening(renderer, layout):
    """Per-pixel floor darkening by the layout's object (its own pixels zeroed), and its position."""
    empty = renderer.render(one_image([]))[0].numpy().astype(np.float64)
    image = renderer.render(layout)[0].numpy().astype(np.float64)
    dark = np.clip((empty - image).mean(-1), 0, None)
    dark[renderer.coverage(layout)[0, 0].numpy() > 0] = 0
    return dark


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_shadows_fall_away_from_the_key_light(renderer, shape):
    away = -np.array(KEY_LIGHT[:2]) / np.linalg.norm(KEY_LIGHT[:2])
    ground = renderer.camera.ground_points().numpy()  # (H, W, 2) world xy of each pixel
    for xy in (np.zeros(2), 2 * _ACROSS, -2 * _ACROSS + _ALONG):
        dark = ground_darkening(renderer, one_image([(BLUE, shape, xy)]))
        offset = ground - xy
        centroid = (dark[..., None] * offset).sum((0, 1)) / dark.sum()
        # The darkened floor lies on the far side of the object from the light ...
        assert centroid @ away / np.linalg.norm(centroid) > 0.75 and centroid @ away > 0.6
        # ... reaching well beyond the object there, and hardly at all towards the light.
        along = offset @ away
        assert dark[along > 1.5].sum() > 10 * dark[along < -1.5].sum() and dark[along > 1.5].max() > 30
