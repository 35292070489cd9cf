"""The toy world and its colour checker (pure functions; no model)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dbbatch.models import toyworld as tw


def test_vocabulary_is_the_issues():
    assert tw.COLOURS == {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
                          "yellow": (240, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
    assert tw.SHAPES == ("circle", "square", "triangle")


def test_held_out_triples_never_drawn_and_every_word_still_seen():
    train = tw.training_triples()
    assert not set(train) & set(tw.HELD_OUT)
    assert len(train) + len(tw.HELD_OUT) == 6 * 3 * 5  # distinct foreground and background colours
    rng = random.Random(0)
    drawn = {(s.colour, s.shape, s.background) for s in (tw.random_scene(rng) for _ in range(5000))}
    assert drawn == set(train)
    for c, s, b in tw.HELD_OUT:
        assert b != c
        assert any(t[0] == c for t in train) and any(t[2] == b for t in train) and any(t[1] == s for t in train)
    assert len(tw.held_out_prompts()) == 48


def test_captions_forms_and_empty_share():
    scene = tw.Scene("red", "circle", "blue", 16, 16, 8)
    assert tw.caption(scene, "full") == "a photo of a red circle on a blue background"
    assert tw.caption(scene, "colour_shape") == "a photo of a red circle"
    assert tw.caption(scene, "shape_background") == "a photo of a circle on a blue background"
    assert tw.caption(scene, "shape") == "a photo of a circle"
    assert tw.caption(scene, "empty") == ""
    rng = random.Random(1)
    empty = np.mean([tw.random_caption(rng, scene) == "" for _ in range(5000)])
    assert 0.08 < empty < 0.12


def test_render_is_seeded_and_the_checker_reads_every_rendered_scene():
    a = [tw.render(tw.random_scene(random.Random(3))) for _ in range(2)]
    assert np.array_equal(a[0], a[1]) and a[0].shape == (tw.SIZE, tw.SIZE, 3) and a[0].dtype == np.uint8
    rng = random.Random(2)
    for _ in range(500):
        scene = tw.random_scene(rng)
        img = tw.render(scene)
        assert tw.background_colour(img) == scene.background
        assert tw.foreground_colour(img) == scene.colour
        assert tw.is_single_coloured(img)
        assert tw.follows_prompt(img, scene.colour, scene.background) == {"background": True, "foreground": True}


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_shapes_differ_and_fit(shape):
    mask = tw.shape_mask(shape, 16, 16, 8)
    assert 0.1 < mask.mean() < 0.3
    assert not mask[0].any() and not mask[-1].any()
    others = [tw.shape_mask(s, 16, 16, 8) for s in tw.SHAPES if s != shape]
    assert all((mask != o).sum() > 20 for o in others)


def test_checker_tolerates_noise_and_reports_no_subject():
    rng = np.random.default_rng(0)
    img = tw.render(tw.Scene("yellow", "square", "black", 14, 18, 7)).astype(float)
    noisy = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    assert tw.background_colour(noisy) == "black" and tw.foreground_colour(noisy) == "yellow"
    flat = np.full((32, 32, 3), tw.COLOURS["green"], dtype=np.uint8)
    assert tw.foreground_colour(flat) is None and tw.split_colours(flat) is None
    assert tw.background_colour(flat) == "green"


def test_split_subject_is_told_from_single_coloured():
    split = tw.render_split("blue", "yellow", "square", "red", 15, 17, 8)
    assert tw.is_split_subject(split, "blue", "yellow")
    assert not tw.is_split_subject(split, "yellow", "blue")
    assert not tw.is_single_coloured(split)
    assert tw.background_colour(split) == "red"
    single = tw.render(tw.Scene("blue", "square", "red", 15, 17, 8))
    assert tw.is_single_coloured(single) and not tw.is_split_subject(single, "blue", "yellow")
