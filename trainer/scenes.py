"""Procedural synthetic scenes: the embedded data set of the trainer.

Each scene is a few flat-coloured shapes (circle, square, triangle) at distinct distances
from the camera over a soft vertical-gradient background, rendered with every target the
UniMRG / SGT recipes need (DESIGN.md 6): the RGB image, a relative inverse depth map, an
instance map, the UniMRG segmentation target (white instance boundaries on black) and the
SGT target (instances filled with distinct colours), plus questions whose answers need
the geometry (depth order, left/right, counting, colour of the nearest object).

Everything is pure numpy and deterministic by seed, so a run needs no download and gives
the same data on every machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220),
           "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30)}
# Every colour + shape pair at most once per scene, so "red circle" names one object.
MAX_OBJECTS = len(SHAPES) * len(COLOURS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen")
assert len(NUMBER_WORDS) > MAX_OBJECTS

MIN_DEPTH, MAX_DEPTH = 0.2, 1.0
# The background is farther than every object: a plane at 1.2 at the bottom row that
# recedes to 1.4 at the top, the same top-to-bottom trend as the background colour.
BACKGROUND_NEAR, BACKGROUND_FAR = 1.2, 1.4
BACKGROUND_TOP = np.array((205, 215, 228), np.float64)
BACKGROUND_BOTTOM = np.array((150, 152, 160), np.float64)
# The farthest object keeps this fraction of its colour (aerial perspective).
FARTHEST_BRIGHTNESS = 0.7
# An object is kept only if this much of it is visible and at least this many pixels.
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 6
PLACEMENT_ATTEMPTS = 50
# "left of" is asked only about objects whose centres are at least this far apart in x.
MIN_LEFT_GAP = 0.05

# SGT instance colours, by instance index: distinct, bright, never black (the background).
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
           (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 255, 128), (255, 0, 128),
           (128, 255, 0), (0, 128, 255), (255, 255, 255), (128, 128, 128), (128, 0, 0),
           (0, 128, 0), (0, 0, 128), (128, 128, 0))
assert len(PALETTE) >= MAX_OBJECTS and len(set(PALETTE)) == len(PALETTE)

PROMPTS = {
    "depth": ["generate the depth map of this image .",
              "produce a depth map for this image .",
              "predict the depth of this image ."],
    "seg": ["generate the segmentation mask of this image .",
            "produce a segmentation map for this image .",
            "segment the objects in this image ."],
    "pixel": ["reconstruct this image .",
              "generate a copy of this image .",
              "redraw this image ."],
}

# Canonical text is lower-case words and punctuation separated by single spaces, so that
# WordTokenizer.decode(encode(text)) == text.
QUESTION_TEMPLATES = {
    "closer": "which is closer , the {a} or the {b} ?",
    "left": "is the {a} left of the {b} ?",
    "count": "how many {shapes} are there ?",
    "colour": "what colour is the {extreme} object ?",
}
QUESTION_KINDS = tuple(QUESTION_TEMPLATES)
EXTREMES = ("nearest", "farthest")
YES, NO = "yes", "no"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in [0, 1], x to the right, y down
    size: float  # radius / half-side as a fraction of the image side
    depth: float  # distance from the camera, larger = farther, in [0.2, 1.0]

    @property
    def name(self) -> str:
        """How questions and answers refer to the object: "colour shape"."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [S, S, 3]
    depth: np.ndarray  # float32 [S, S] in [0, 1], relative inverse depth, 1 = nearest
    instances: np.ndarray  # int16 [S, S]: 0 background, i + 1 for objects[i]
    seg_edges: np.ndarray  # uint8 [S, S, 3]: white instance boundaries on black
    seg_colour: np.ndarray  # uint8 [S, S, 3]: instances filled with PALETTE[i], black bg
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # one of QUESTION_KINDS


# ------------------------------------------------------------------------------ rendering
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in [0, 1], each [S, S]."""
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y


def shape_mask(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pixels covered by the object if nothing occluded it (bool [S, S])."""
    cx, cy = obj.center
    r = obj.size
    dx, dy = x - cx, y - cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":
        # Apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r): the
        # half-width grows linearly from 0 at the apex to r at the base.
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {obj.shape!r}")


def brightness(depth: float) -> float:
    """Colour scale of an object at this distance: 1 at the nearest, 0.7 at the farthest."""
    t = (depth - MIN_DEPTH) / (MAX_DEPTH - MIN_DEPTH)
    return 1.0 - (1.0 - FARTHEST_BRIGHTNESS) * t


def paint_instances(objects, size: int) -> np.ndarray:
    """Instance map (int16 [S, S]): objects painted far to near, so nearer ones occlude."""
    x, y = pixel_grid(size)
    instances = np.zeros((size, size), np.int16)
    for index in sorted(range(len(objects)), key=lambda i: -objects[i].depth):
        instances[shape_mask(objects[index], x, y)] = index + 1
    return instances


def render_image(objects, instances: np.ndarray) -> np.ndarray:
    size = instances.shape[0]
    t = ((np.arange(size) + 0.5) / size)[:, None, None]
    image = (1 - t) * BACKGROUND_TOP + t * BACKGROUND_BOTTOM
    image = np.broadcast_to(image, (size, size, 3)).copy()
    for index, obj in enumerate(objects):
        image[instances == index + 1] = np.asarray(COLOURS[obj.colour]) * brightness(obj.depth)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_depth(objects, instances: np.ndarray) -> np.ndarray:
    """Per-image min-max normalised inverse distance, as Depth Anything predicts it."""
    size = instances.shape[0]
    t = ((np.arange(size) + 0.5) / size)[:, None]
    distance = np.broadcast_to(BACKGROUND_FAR + (BACKGROUND_NEAR - BACKGROUND_FAR) * t,
                               (size, size)).copy()
    for index, obj in enumerate(objects):
        distance[instances == index + 1] = obj.depth
    inverse = 1.0 / distance
    span = inverse.max() - inverse.min()
    return ((inverse - inverse.min()) / span).astype(np.float32)


# OpenCV's tan(22.5 deg) in 15-bit fixed point: its Canny sorts gradients into sectors so
_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def canny_edges(mask: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """bool [H, W]: cv2.Canny(mask * 255, low, high) of a binary mask, in numpy (UniMRG
    draws each SAM mask's Canny (100, 200) edges; no OpenCV dependency). OpenCV's steps:
    3x3 Sobel with a replicated border, |dx| + |dy|, non-maximum suppression in four
    sectors with its tie-breaking (a 0/1 step keeps the pixel before it: the line sits
    just outside a mask's left and top sides and on its right and bottom ones, corners
    cut), then hysteresis. Checked equal to cv2.Canny on 2,000 random masks (noise,
    rectangles, discs; opencv-python-headless 5.0)."""
    image = np.asarray(mask, bool).astype(np.int64) * 255
    p = np.pad(image, 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    m = np.pad(np.abs(dx) + np.abs(dy), 1)      # magnitudes outside the image are 0
    c = m[1:-1, 1:-1]
    x, y = np.abs(dx), np.abs(dy) << 15
    tg22x = x * _TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << 16))
    same_sign = (dx ^ dy) >= 0
    keep = np.where(
        horizontal, (c > m[1:-1, :-2]) & (c >= m[1:-1, 2:]),
        np.where(vertical, (c > m[:-2, 1:-1]) & (c >= m[2:, 1:-1]),
                 (c > np.where(same_sign, m[:-2, :-2], m[:-2, 2:]))
                 & (c > np.where(same_sign, m[2:, 2:], m[2:, :-2]))))
    candidate = keep & (c > low)
    edges = candidate & (c > high)
    while True:   # hysteresis: weak candidates 8-connected to a strong edge
        e = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for di in range(3):
            for dj in range(3):
                near |= e[di:di + edges.shape[0], dj:dj + edges.shape[1]]
        grown = edges | (near & candidate)
        if (grown == edges).all():
            return edges
        edges = grown


def instance_boundaries(instances: np.ndarray) -> np.ndarray:
    """bool [S, S]: every instance mask's Canny edges, max-combined (UniMRG's rule for its
    SAM masks, DESIGN.md section 6). The image border is not an edge (Canny replicates it)."""
    edges = np.zeros(instances.shape, bool)
    for label in np.unique(instances):
        if label > 0:
            edges |= canny_edges(instances == label)
    return edges


def render_seg_edges(instances: np.ndarray) -> np.ndarray:
    edges = np.where(instance_boundaries(instances), 255, 0).astype(np.uint8)
    return np.repeat(edges[:, :, None], 3, axis=2)


def render_seg_colour(instances: np.ndarray) -> np.ndarray:
    lookup = np.array(((0, 0, 0),) + PALETTE, np.uint8)
    return lookup[instances]


# ------------------------------------------------------------------------------- sampling
def visibility_ok(objects, instances: np.ndarray) -> bool:
    """Every object shows at least half of itself and a few pixels (answerable questions)."""
    x, y = pixel_grid(instances.shape[0])
    for index, obj in enumerate(objects):
        full = int(shape_mask(obj, x, y).sum())
        visible = int((instances == index + 1).sum())
        if visible < MIN_VISIBLE_PIXELS or visible < MIN_VISIBLE_FRACTION * full:
            return False
    return True


def sample_depths(rng: np.random.Generator, count: int) -> np.ndarray:
    """Distinct distances in [0.2, 1.0], at least half a slot apart, so "closer" is clear."""
    slot = (MAX_DEPTH - MIN_DEPTH) / count
    depths = MIN_DEPTH + (np.arange(count) + rng.uniform(0.25, 0.75, count)) * slot
    return rng.permutation(depths)


def sample_sizes(rng: np.random.Generator, count: int, image_size: int) -> np.ndarray:
    # Shrink objects when there are many so they still fit; never below 2 px, where a
    # triangle would cover only a handful of pixel centres.
    crowding = min(1.0, math.sqrt(4 / count))
    low = max(0.10 * crowding, 2.0 / image_size)
    high = max(0.20 * crowding, low)
    return rng.uniform(low, high, count)


def random_centres(rng: np.random.Generator, sizes: np.ndarray) -> list[tuple[float, float]]:
    # Centres keep the whole shape inside the image, so only occlusion hides it.
    return [(float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r))) for r in sizes]


def grid_layout(rng: np.random.Generator, sizes: np.ndarray):
    """Fallback: one object per grid cell, sized to fill most of it, so none overlaps another."""
    cells_per_side = math.ceil(math.sqrt(len(sizes)))
    cell = 1.0 / cells_per_side
    cells = rng.permutation(cells_per_side * cells_per_side)[:len(sizes)]
    centres = [((c % cells_per_side + 0.5) * cell, (c // cells_per_side + 0.5) * cell)
               for c in cells]
    return centres, np.clip(sizes, 0.35 * cell, 0.45 * cell)


def make_objects(kinds, depths, sizes, centres) -> tuple[SceneObject, ...]:
    return tuple(SceneObject(shape=shape, colour=colour, center=(float(cx), float(cy)),
                             size=float(r), depth=float(d))
                 for (shape, colour), d, r, (cx, cy) in zip(kinds, depths, sizes, centres))


def place_objects(rng: np.random.Generator, kinds, depths, sizes, image_size: int):
    """Objects and their instance map, resampling positions until each is visible enough."""
    for _ in range(PLACEMENT_ATTEMPTS):
        objects = make_objects(kinds, depths, sizes, random_centres(rng, sizes))
        instances = paint_instances(objects, image_size)
        if visibility_ok(objects, instances):
            return objects, instances
    centres, sizes = grid_layout(rng, sizes)
    objects = make_objects(kinds, depths, sizes, centres)
    instances = paint_instances(objects, image_size)
    if not visibility_ok(objects, instances):
        raise ValueError(f"size={image_size} is too small for {len(kinds)} objects of at "
                         f"least {MIN_VISIBLE_PIXELS} visible pixels each; use a larger size "
                         f"or fewer objects")
    return objects, instances


def validate_scene_args(seed, size, min_objects, max_objects) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS} (unique "
                         f"colour + shape pairs), got min_objects={min_objects}, "
                         f"max_objects={max_objects}")


def make_scene(seed: int, size: int = 32, *, min_objects: int = 2,
               max_objects: int = 4) -> Scene:
    """The scene of this seed: same seed, same arrays, on every machine."""
    validate_scene_args(seed, size, min_objects, max_objects)
    rng = np.random.default_rng(seed)
    count = int(rng.integers(min_objects, max_objects + 1))
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    kinds = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
    depths = sample_depths(rng, count)
    sizes = sample_sizes(rng, count, size)
    objects, instances = place_objects(rng, kinds, depths, sizes, size)
    return Scene(image=render_image(objects, instances),
                 depth=render_depth(objects, instances),
                 instances=instances,
                 seg_edges=render_seg_edges(instances),
                 seg_colour=render_seg_colour(instances),
                 objects=objects)


# ------------------------------------------------------------------------------ questions
def ask_closer(scene: Scene, rng: np.random.Generator) -> QA | None:
    if len(scene.objects) < 2:
        return None
    a, b = (scene.objects[i] for i in rng.choice(len(scene.objects), size=2, replace=False))
    nearer = a if a.depth < b.depth else b
    return QA(QUESTION_TEMPLATES["closer"].format(a=a.name, b=b.name), nearer.name, "closer")


def ask_left(scene: Scene, rng: np.random.Generator) -> QA | None:
    # Only pairs clearly apart in x: a near-tie would be a coin flip to the model.
    pairs = [(a, b) for a in scene.objects for b in scene.objects
             if a is not b and abs(a.center[0] - b.center[0]) >= MIN_LEFT_GAP]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    answer = YES if a.center[0] < b.center[0] else NO
    return QA(QUESTION_TEMPLATES["left"].format(a=a.name, b=b.name), answer, "left")


def ask_count(scene: Scene, rng: np.random.Generator) -> QA:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    count = sum(obj.shape == shape for obj in scene.objects)
    question = QUESTION_TEMPLATES["count"].format(shapes=SHAPE_PLURALS[shape])
    return QA(question, NUMBER_WORDS[count], "count")


def ask_colour(scene: Scene, rng: np.random.Generator) -> QA:
    extreme = EXTREMES[int(rng.integers(len(EXTREMES)))]
    pick = min if extreme == "nearest" else max
    target = pick(scene.objects, key=lambda obj: obj.depth)
    return QA(QUESTION_TEMPLATES["colour"].format(extreme=extreme), target.colour, "colour")


ASKERS = {"closer": ask_closer, "left": ask_left, "count": ask_count, "colour": ask_colour}


def make_questions(scene: Scene, seed: int, k: int = 1) -> list[QA]:
    """k questions about the scene, kinds drawn uniformly among those it can answer.

    Repeats are avoided while a few redraws allow it (small scenes have few questions).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rng = np.random.default_rng(seed)
    questions: list[QA] = []
    for _ in range(k):
        for _ in range(10):
            qa = None
            while qa is None:  # count and colour are always answerable
                qa = ASKERS[QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]](scene, rng)
            if qa not in questions:
                break
        questions.append(qa)
    return questions


# ----------------------------------------------------------------------------- vocabulary
def object_names() -> list[str]:
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def all_texts() -> list[str]:
    """Every question template filled every way, every answer and prompt: the language."""
    names = object_names()
    texts = [QUESTION_TEMPLATES["closer"].format(a=names[0], b=names[1])]
    texts += [QUESTION_TEMPLATES["left"].format(a=names[0], b=names[1])]
    texts += [QUESTION_TEMPLATES["count"].format(shapes=p) for p in SHAPE_PLURALS.values()]
    texts += [QUESTION_TEMPLATES["colour"].format(extreme=e) for e in EXTREMES]
    texts += names + list(COLOURS) + list(NUMBER_WORDS) + [YES, NO]
    texts += [prompt for paraphrases in PROMPTS.values() for prompt in paraphrases]
    return texts


def vocabulary_words() -> list[str]:
    """Sorted set of every word (and punctuation token) the synthetic language uses."""
    return sorted({word for text in all_texts() for word in text.split()})
