"""The scene generator: captions match images, the parser reads them back, held-out stays out."""

import random
from collections import Counter

import pytest
import torch

from easel.training.tinyshapes.data import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    PromptError,
    Scene,
    SceneStream,
    ShapeObject,
    caption,
    corpus_words,
    is_held_out,
    parse_prompt,
    render,
    sample_scene,
    training_scene,
)


def _pixel(image: torch.Tensor, x: float, y: float) -> tuple[int, ...]:
    column, row = min(63, int(x * 64)), min(63, int(y * 64))
    return tuple(int(v) for v in (image[:, row, column] * 255).round())


def _close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return max(abs(p - q) for p, q in zip(a, b, strict=True)) <= 1


def test_pixels_match_what_the_caption_says():
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(300)]
    scenes += [Scene((ShapeObject(s, "red", z),), "white") for s in SHAPES for z in SIZES]
    images = render(scenes)
    assert images.shape == (len(scenes), 3, 64, 64)
    for scene, image in zip(scenes, images, strict=True):
        # Read the caption back (not the scene) so the test checks what a user would be told.
        told = parse_prompt(caption(scene, rng))
        for x, y in ((0, 0), (0.99, 0), (0, 0.99), (0.99, 0.99)):
            assert _close(_pixel(image, x, y), COLOURS[told.background]), caption(scene)
        for obj in told.objects:
            x, y = POSITIONS[obj.position]
            assert _close(_pixel(image, x, y), COLOURS[obj.colour]), caption(scene)


def test_shapes_differ_in_pixels():
    # Same colour, size and place: every pair of shapes differs in many pixels (a blob is not
    # a triangle), and sizes grow in area.
    images = render([Scene((ShapeObject(s, "black", "big"),), "white") for s in SHAPES])
    masks = images.mean(dim=1) < 0.5
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (masks[i] ^ masks[j]).sum() > 60, (SHAPES[i], SHAPES[j])
    areas = [
        (render([Scene((ShapeObject("square", "black", z),), "white")]).mean(1) < 0.5).sum()
        for z in ("small", "medium", "big")
    ]
    assert areas[0] < areas[1] < areas[2]


def test_random_captions_parse_back_to_their_scene():
    rng = random.Random(2)
    words, openings = set(), set()
    for _ in range(3000):
        scene = sample_scene(rng)
        assert parse_prompt(caption(scene)) == scene
        text = caption(scene, rng)
        assert parse_prompt(text) == scene, text
        words.update(text.replace(",", " ,").split())
        openings.add(text.split()[1] in COLOURS)
    # synonyms and word-order variety all occur, and only corpus words are used
    assert {"grey", "disc", "plus", "box", "large", "tiny", "against", "middle", ","} <= words
    assert words <= set(corpus_words())
    assert openings == {True, False}


def test_required_prompt_forms():
    assert parse_prompt("a red circle on a white background") == Scene(
        (ShapeObject("circle", "red", "medium", "centre"),), "white"
    )
    big = parse_prompt("a big blue star on a black background").objects[0]
    assert (big.size, big.shape, big.colour) == ("big", "star", "blue")
    assert parse_prompt("a small green square on a pink background").objects[0].size == "small"
    assert parse_prompt("a red circle on the left on a white background").objects[0].position == (
        "left"
    )
    two = parse_prompt("a red circle and a blue square on a white background")
    assert two.objects == (
        ShapeObject("circle", "red", "medium", "left"),
        ShapeObject("square", "blue", "medium", "right"),
    )
    assert caption(two) == "a red circle and a blue square on a white background"
    assert caption(parse_prompt("an orange cross on a gray background")).startswith("an orange")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a red circle", "background"),
        ("a red circle on a plaid background", "plaid"),
        ("a red hexagon on a white background", "hexagon"),
        ("a red circle and a blue star and a red dot on a white background", "at most two"),
    ],
)
def test_parser_names_what_it_cannot_read(prompt, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(prompt)


def test_training_batches_never_contain_held_out_combinations():
    stream = SceneStream(seed=3)
    seen = set()
    for _ in range(20):
        batch = stream.batch(100)
        assert batch.images.shape == (100, 3, 64, 64)
        assert batch.images.min() >= -1 and batch.images.max() <= 1
        for scene, text in zip(batch.scenes, batch.captions, strict=True):
            assert not is_held_out(scene)
            assert not is_held_out(parse_prompt(text))
            seen.update(scene.combos())
    assert not seen & set(HELD_OUT)
    assert len(seen) > 400  # the rest of the (colour, shape, background) space is covered


def test_two_objects_never_overlap_and_colours_differ():
    rng = random.Random(4)
    for _ in range(2000):
        scene = sample_scene(rng, two_object_rate=1.0)
        first, second = scene.objects
        assert len({first.colour, second.colour, scene.background}) == 3
        (x1, y1), (x2, y2) = POSITIONS[first.position], POSITIONS[second.position]
        gap = max(abs(x1 - x2), abs(y1 - y2)) - SIZES[first.size] - SIZES[second.size]
        assert gap * 64 > 3  # pixels, more than the jitter and the anti-aliased edge


def test_held_out_list_is_fixed_and_valid():
    assert len(HELD_OUT) == len(set(HELD_OUT)) >= 10
    for colour, shape, background in HELD_OUT:
        assert colour in COLOURS and background in COLOURS and shape in SHAPES
        assert colour != background
    assert {shape for _, shape, _ in HELD_OUT} == set(SHAPES)


def test_render_runs_on_the_requested_device_and_jitters_within_bounds():
    scenes = [Scene((ShapeObject("circle", "red", "small", "left"),), "white")] * 8
    plain = render(scenes)
    moved = render(scenes, jitter=1.0, generator=torch.Generator().manual_seed(0))
    assert plain.device.type == "cpu"
    assert not torch.equal(plain, moved)
    assert (plain - moved).abs().sum(dim=(1, 2, 3)).max() < 60  # a pixel's shift, not a new image


def test_mosaics_tile_four_object_crops_at_true_size():
    stream = SceneStream(seed=5)
    mosaics = stream.mosaics(6)
    assert mosaics.shape == (6, 3, 64, 64)
    assert mosaics.min() >= -1 and mosaics.max() <= 1
    quadrants = mosaics.unfold(2, 32, 32).unfold(3, 32, 32)  # (6, 3, 2, 2, 32, 32)
    for image in quadrants.permute(0, 2, 3, 1, 4, 5).reshape(24, 3, 32 * 32):
        colours = {tuple(c) for c in (image.T * 127.5).round().int().tolist()}
        assert len(colours) >= 3  # background, object and anti-aliased edge: every crop shows one
    # a crop is a piece of a rendered scene, pixel for pixel (same scale): the first tile's
    # scene, drawn again from the same seed, contains it
    again = SceneStream(seed=5)
    scene_image = again.batch(24).images[0]
    tile = mosaics[0, :, :32, :32]
    windows = scene_image.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 33, 33, 32, 32)
    matches = (windows - tile[:, None, None]).abs().amax(dim=(0, 3, 4)) < 1e-6
    assert matches.any()


def test_autoencoder_images_mix_plain_scenes_and_mosaics():
    assert SceneStream(seed=1).autoencoder_images(8, 0.5).shape == (8, 3, 64, 64)
    plain = SceneStream(seed=1).autoencoder_images(4, 0.0)
    assert torch.equal(plain, SceneStream(seed=1).batch(4).images)
    assert SceneStream(seed=1).autoencoder_images(3, 1.0).shape == (3, 3, 64, 64)


def test_training_scenes_favour_small_stars_and_crosses_and_hold_nothing_out() -> None:
    rng = random.Random(0)
    scenes = [training_scene(rng, 0.5) for _ in range(4000)]
    assert not any(is_held_out(s) for s in scenes)
    small = [o for s in scenes for o in s.objects if o.size == "small"]
    assert 0.5 < len(small) / sum(len(s.objects) for s in scenes) < 0.75
    shapes = Counter(o.shape for o in small)
    assert shapes["star"] > 1.5 * shapes["circle"] and shapes["cross"] > 1.5 * shapes["square"]


def test_a_stream_with_a_hard_share_draws_small_objects_and_none_without() -> None:
    hard = SceneStream(seed=2, hard_share=1.0).batch(64).scenes
    assert all(o.size == "small" for s in hard for o in s.objects)
    assert not any(is_held_out(s) for s in hard)
    rng = random.Random(2)
    assert SceneStream(seed=2).batch(64).scenes == [sample_scene(rng) for _ in range(64)]
