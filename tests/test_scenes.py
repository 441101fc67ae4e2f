"""trainer.scenes: every rendering and every answer is re-derived here from the objects.

The oracles below are written from the definitions (painter's order by distance, 4-neighbour
boundaries, the question wording), not by calling the module's own helpers.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from trainer import scenes
from trainer.scenes import COLOURS, PROMPTS, SHAPES, make_questions, make_scene

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
           "seventeen", "eighteen"]


def scene_seeds(seed, count=12):
    return [seed % 100_000 * 37 + i for i in range(count)]


# -------------------------------------------------------------------------------- oracles
def covers(obj, x, y):
    """The object's footprint from its definition; triangle apex up, base at cy + r."""
    cx, cy = obj.center
    r = obj.size
    if obj.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if obj.shape == "square":
        return max(abs(x - cx), abs(y - cy)) <= r
    apex, left, right = (cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)

    def side(a, b):  # > 0 when (x, y) lies to the right of a -> b in image coordinates
        return (b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0])
    return side(apex, right) >= 0 and side(right, left) >= 0 and side(left, apex) >= 0


def painted_instances(scene):
    """Per pixel: the nearest object whose footprint holds the pixel centre."""
    size = scene.image.shape[0]
    expected = np.zeros((size, size), np.int16)
    for row in range(size):
        for col in range(size):
            x, y = (col + 0.5) / size, (row + 0.5) / size
            hits = [i for i, obj in enumerate(scene.objects) if covers(obj, x, y)]
            if hits:
                expected[row, col] = min(hits, key=lambda i: scene.objects[i].depth) + 1
    return expected


def boundary_oracle(instances):
    """Instance pixels with a 4-neighbour inside the image that carries another label."""
    size = instances.shape[0]
    edges = np.zeros_like(instances, dtype=bool)
    for row in range(size):
        for col in range(size):
            label = instances[row, col]
            if label == 0:
                continue
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                r, c = row + dr, col + dc
                if 0 <= r < size and 0 <= c < size and instances[r, c] != label:
                    edges[row, col] = True
    return edges


def by_name(scene, name):
    colour, shape = name.split()
    (obj,) = [o for o in scene.objects if o.colour == colour and o.shape == shape]
    return obj


def answer_oracle(scene, question):
    """The answer, parsed back out of the question text and computed from the objects."""
    names = r"(\w+ \w+)"
    if m := re.fullmatch(rf"which is closer , the {names} or the {names} \?", question):
        a, b = by_name(scene, m[1]), by_name(scene, m[2])
        return m[1] if a.depth < b.depth else m[2]
    if m := re.fullmatch(rf"is the {names} left of the {names} \?", question):
        a, b = by_name(scene, m[1]), by_name(scene, m[2])
        assert abs(a.center[0] - b.center[0]) > 0.01, "left-of asked about a near tie"
        return "yes" if a.center[0] < b.center[0] else "no"
    if m := re.fullmatch(r"how many (\w+)s are there \?", question):
        return NUMBERS[sum(o.shape == m[1] for o in scene.objects)]
    if m := re.fullmatch(r"what colour is the (nearest|farthest) object \?", question):
        depths = [o.depth for o in scene.objects]
        pick = np.argmin(depths) if m[1] == "nearest" else np.argmax(depths)
        return scene.objects[pick].colour
    raise AssertionError(f"unexpected question wording: {question!r}")


# ---------------------------------------------------------------------------------- tests
def assert_scenes_equal(a, b):
    for field in ("image", "depth", "instances", "seg_edges", "seg_colour"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.objects == b.objects


def test_deterministic_by_seed(seed):
    s = seed % 1_000_000
    assert_scenes_equal(make_scene(s), make_scene(s))
    assert make_questions(make_scene(s), s, k=5) == make_questions(make_scene(s), s, k=5)
    others = [make_scene(s + i) for i in range(1, 4)]
    assert all(not np.array_equal(make_scene(s).image, o.image) for o in others)
    # Question draws depend on their own seed, not only on the scene.
    scene = make_scene(s)
    drawn = {tuple(make_questions(scene, q, k=3)) for q in range(8)}
    assert len(drawn) > 1


@pytest.mark.parametrize("size", [16, 32, 48])
def test_arrays_shapes_and_ranges(seed, size):
    for s in scene_seeds(seed, 6):
        scene = make_scene(s, size)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.depth.shape == (size, size) and scene.depth.dtype == np.float32
        assert scene.instances.shape == (size, size) and scene.instances.dtype == np.int16
        for target in (scene.seg_edges, scene.seg_colour):
            assert target.shape == (size, size, 3) and target.dtype == np.uint8
        assert scene.depth.min() == 0.0 and scene.depth.max() == 1.0, "not min-max normalised"
        assert 2 <= len(scene.objects) <= 4
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs), f"colour + shape repeated: {pairs}"
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS
            assert 0.2 <= obj.depth <= 1.0 and 0.0 < obj.size < 0.5
            assert 0.0 <= obj.center[0] <= 1.0 and 0.0 <= obj.center[1] <= 1.0


def test_instances_follow_painters_order(seed):
    for s in scene_seeds(seed, 6):
        scene = make_scene(s)
        expected = painted_instances(scene)
        diff = np.argwhere(expected != scene.instances)
        assert len(diff) == 0, f"seed {s}: instances differ at {diff[:5].tolist()}"
        for i in range(len(scene.objects)):
            visible = int((scene.instances == i + 1).sum())
            assert visible >= 4, f"seed {s}: object {i} has only {visible} visible pixels"


def test_image_agrees_with_instances(seed):
    for s in scene_seeds(seed):
        scene = make_scene(s)
        image = scene.image.astype(np.float64)
        scales = []
        for i, obj in enumerate(scene.objects):
            pixels = image[scene.instances == i + 1]
            assert (pixels == pixels[0]).all(), f"seed {s}: object {i} is not one flat colour"
            base = np.array(COLOURS[obj.colour], np.float64)
            scale = pixels[0].sum() / base.sum()
            assert 0.65 <= scale <= 1.0 + 1e-9, f"seed {s}: object {i} brightness {scale}"
            assert np.abs(pixels[0] - base * scale).max() <= 1.5, \
                f"seed {s}: object {i} colour {pixels[0]} is not a darkened {base}"
            scales.append((obj.depth, scale))
        scales.sort()
        assert all(a[1] > b[1] for a, b in zip(scales, scales[1:])), \
            f"seed {s}: farther objects must be darker: {scales}"
        background = scene.instances == 0
        for row in range(image.shape[0]):
            values = image[row][background[row]]
            assert (values == values[:1]).all(), f"seed {s}: background row {row} not constant"


def test_depth_agrees_with_objects(seed):
    for s in scene_seeds(seed):
        scene = make_scene(s)
        background = scene.depth[scene.instances == 0]
        values = []
        for i, obj in enumerate(scene.objects):
            at_object = scene.depth[scene.instances == i + 1]
            assert np.ptp(at_object) == 0, f"seed {s}: object {i} depth is not flat"
            values.append((obj.depth, float(at_object[0])))
        values.sort()
        assert values[0][1] == 1.0, f"seed {s}: the nearest object must be 1"
        assert all(a[1] > b[1] for a, b in zip(values, values[1:])), \
            f"seed {s}: nearer objects need larger inverse depth: {values}"
        assert background.max() < values[-1][1], f"seed {s}: background is not farthest"
        assert background.min() == 0.0
        # Inverse depth is relative: the ratio of two objects' inverse distances survives
        # min-max normalisation only through the affine map, which must be the same for all.
        inverse = np.array([1 / d for d, _ in values])
        normalised = np.array([v for _, v in values])
        if len(values) >= 3:
            slope = np.polyfit(inverse, normalised, 1)
            np.testing.assert_allclose(np.polyval(slope, inverse), normalised, atol=1e-5)


def test_seg_edges_are_instance_boundaries(seed):
    for s in scene_seeds(seed, 6):
        scene = make_scene(s)
        edges = scene.seg_edges
        assert set(np.unique(edges)) <= {0, 255}, "not white on black"
        assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
        # UniMRG's rule: each instance mask's Canny edges, max-combined (canny_edges is
        # checked against OpenCV's own output in test_prepare.py)
        expected = np.zeros(scene.instances.shape, bool)
        for label in range(1, len(scene.objects) + 1):
            expected |= scenes.canny_edges(scene.instances == label)
        diff = np.argwhere((edges[..., 0] == 255) != expected)
        assert len(diff) == 0, f"seed {s}: seg edges differ at {diff[:5].tolist()}"
        assert expected.any()
        # and every edge pixel lies on an instance boundary or next to one
        near = np.pad(boundary_oracle(scene.instances), 1)
        size = scene.instances.shape[0]
        around = np.zeros_like(expected)
        for dr in range(3):
            for dc in range(3):
                around |= near[dr:dr + size, dc:dc + size]
        assert not (expected & ~around).any(), f"seed {s}: an edge far from any boundary"


def test_seg_colour_fills_instances(seed):
    for s in scene_seeds(seed):
        scene = make_scene(s)
        assert (scene.seg_colour[scene.instances == 0] == 0).all(), "background must be black"
        colours = []
        for i in range(len(scene.objects)):
            pixels = scene.seg_colour[scene.instances == i + 1]
            assert (pixels == pixels[0]).all(), f"seed {s}: instance {i} not one colour"
            assert pixels[0].any(), f"seed {s}: instance {i} painted black"
            colours.append(tuple(pixels[0]))
        assert len(set(colours)) == len(colours), f"seed {s}: instance colours repeat"
    # The colour is a function of the instance index: the same index, the same colour.
    a, b = make_scene(seed % 1000), make_scene(seed % 1000 + 1)
    assert np.array_equal(a.seg_colour[a.instances == 1][0], b.seg_colour[b.instances == 1][0])


def test_crowded_scenes_keep_every_object_visible(seed):
    scene = make_scene(seed % 1000, 32, min_objects=18, max_objects=18)
    assert len({(o.colour, o.shape) for o in scene.objects}) == 18
    assert np.array_equal(scene.instances, painted_instances(scene))
    assert all((scene.instances == i + 1).sum() >= 4 for i in range(18))
    single = make_scene(seed % 1000, 16, min_objects=1, max_objects=1)
    assert len(single.objects) == 1 and (single.instances == 1).sum() >= 4


def test_answers_are_correct(seed):
    kinds = set()
    for s in scene_seeds(seed, 40):
        scene = make_scene(s)
        for qa in make_questions(scene, s + 1, k=4):
            kinds.add(qa.kind)
            assert qa.question == " ".join(qa.question.split()) == qa.question.lower()
            assert qa.question.endswith(" ?")
            assert qa.answer == answer_oracle(scene, qa.question), f"seed {s}: {qa}"
    assert kinds == {"closer", "left", "count", "colour"}


def test_questions_need_no_more_objects_than_exist(seed):
    scene = make_scene(seed % 1000, min_objects=1, max_objects=1)
    questions = make_questions(scene, seed, k=6)
    assert len(questions) == 6
    assert {qa.kind for qa in questions} <= {"count", "colour"}
    assert make_questions(scene, seed, k=0) == []


def test_prompts():
    assert set(PROMPTS) == {"depth", "seg", "pixel"}
    for task, paraphrases in PROMPTS.items():
        assert len(paraphrases) == 3 and len(set(paraphrases)) == 3, task
        for prompt in paraphrases:
            assert prompt == " ".join(prompt.split()) == prompt.lower() and prompt.endswith(" .")
    assert "generate the depth map of this image ." in PROMPTS["depth"]
    assert "generate the segmentation mask of this image ." in PROMPTS["seg"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(seed=-1), "seed"),
    (dict(seed=0, size=8), "size"),
    (dict(seed=0, min_objects=3, max_objects=2), "min_objects"),
    (dict(seed=0, max_objects=19), "max_objects"),
    (dict(seed=0, min_objects=0), "min_objects"),
])
def test_make_scene_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_scene(**kwargs)


def test_make_questions_errors():
    with pytest.raises(ValueError, match="k"):
        make_questions(make_scene(0), 0, k=-1)


def test_vocabulary_covers_every_word(seed):
    vocabulary = set(scenes.vocabulary_words())
    for s in scene_seeds(seed, 30):
        for qa in make_questions(make_scene(s), s, k=3):
            assert set(qa.question.split()) | set(qa.answer.split()) <= vocabulary, qa
