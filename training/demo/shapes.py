"""The shapes world: procedurally generated scenes, written in standard dataset formats.

    qbridge data shapes --out data/shapes --n 20000 --seed 0 --noise 0.3

A scene is 1..``max_objects`` coloured shapes (shape x colour x size, at a position) on a varied
background. Everything is a pure function of ``(seed, split, index)``: scene ``i`` of seed ``s``
is the same whatever ``n`` is, and the same arguments give byte-identical files.

The world writes the formats real data comes in (COCO captions, VQAv2, COCO instances,
WebDataset shards), so the demo and real datasets share one reading path (``training.datasets``).

Splits: ``train`` (captions carry web-like noise at rate ``noise``), ``val`` and ``test`` (clean),
and ``heldout`` (compositional: every scene holds at least one of :data:`HELDOUT_PAIRS`, which
never occur in the other splits, not even in their text).

Caption grammar (fixed, so :func:`parse_caption` can read captions back)
--------------------------------------------------------------------------
``<obj>`` is ``<count> [<size>] <colour> <shape>``: count ``a``/``an``/``two``..``ten``, the shape
plural after a count above one. Lists join as ``x``, ``x and y``, ``x, y and z``.

* brief:    ``<obj list without sizes>`` (objects with one label grouped)
  e.g. ``a red circle, two blue squares and an orange star``
* normal:   ``there are <N> shapes: <obj list with sizes>.`` (``there is one shape: ...``)
  e.g. ``there are three shapes: a large red circle and two small blue squares.``
* detailed: ``there are <N> shapes on a <background> background.`` then one sentence per object
  in reading order, ``<a> <size> <colour> <shape> is <position>.``
  e.g. ``there are two shapes on a grey background. a large red circle is in the top left.
  a small blue square is at the bottom.``

Positions are the 3x3 cell of the box centre: rows top/middle/bottom, columns left/center/right,
written ``in the top left``, ``at the top``, ``in the top right``, ``on the left``, ``in the center``,
``on the right``, ``in the bottom left``, ``at the bottom``, ``in the bottom right``.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from random import Random

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from qformer.boxes import reading_order_key

WORLD_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
PLURALS = {**{s: s + "s" for s in SHAPES}, "cross": "crosses"}
# Saturated or extreme colours; every background below is a muted mid-tone, so none of them
# blends into the background.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 35),
    "purple": (150, 60, 190),
    "orange": (250, 140, 25),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
# Diameter as a fraction of the shorter image side. The gaps between ranges keep the size words
# unambiguous.
SIZES = {"small": (0.10, 0.14), "medium": (0.18, 0.23), "large": (0.28, 0.34)}
BACKGROUNDS = ("grey", "beige", "slate", "gradient", "striped", "checkered", "noisy")
# Never in train/val/test (images or text); at least one in every heldout scene.
HELDOUT_PAIRS = (("red", "star"), ("blue", "triangle"), ("green", "hexagon"), ("yellow", "diamond"))
ALL_PAIRS = tuple((c, s) for s in SHAPES for c in COLOURS)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
SPLITS = ("train", "val", "test", "heldout")
# Image ids are unique across splits so that splits can be mixed; hence at most 10M per split.
SPLIT_ID_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000, "heldout": 30_000_000}
LEVELS = ("brief", "normal", "detailed")
NOISE_KINDS = ("other_image", "wrong_attribute", "generic")
GENERIC_CAPTIONS = (
    "a nice picture", "image", "photo of stuff", "untitled", "img_0231.jpg", "wallpaper hd",
    "abstract art", "my favourite picture", "stock photo", "click here to see more",
    "cool design", "screenshot", "download free", "picture of the day", "art print for sale",
)
# One category per colour-shape label, the same ids in every split and for every seed.
CATEGORIES = tuple(
    {"id": i + 1, "name": f"{c} {s}", "supercategory": s} for i, (c, s) in enumerate(ALL_PAIRS)
)
CATEGORY_ID = {cat["name"]: cat["id"] for cat in CATEGORIES}

ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITION_PHRASES = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top",
    ("top", "right"): "in the top right", ("middle", "left"): "on the left",
    ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
# Answer to "where is the X?": only the five cells one word names; corners are never asked.
POSITION_ANSWERS = {
    ("top", "center"): "top", ("bottom", "center"): "bottom", ("middle", "left"): "left",
    ("middle", "right"): "right", ("middle", "center"): "center",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_IOU = 0.05  # rejection sampling: objects overlap little ...
MAX_COVER = 0.15  # ... and no small object hides under a big one (intersection / smaller box)

# Shape extents relative to the diameter (width, height): shapes of one size look alike in size.
_EXTENT = {
    "circle": (1.0, 1.0), "square": (0.85, 0.85), "triangle": (1.0, 0.87), "star": (1.0, 0.95),
    "hexagon": (0.87, 1.0), "diamond": (0.8, 1.0), "cross": (0.9, 0.9),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels; the shape touches all four edges

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    id: int
    width: int
    height: int
    background: str
    objects: tuple[Obj, ...]

    def cell(self, obj: Obj) -> tuple[str, str]:
        """(row, col) of the 3x3 cell holding the centre of ``obj``'s box."""
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        return ROWS[min(int(3 * cy / self.height), 2)], COLS[min(int(3 * cx / self.width), 2)]

    def to_dict(self) -> dict:
        return {
            "id": self.id, "width": self.width, "height": self.height,
            "background": self.background, "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = tuple(Obj(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in d["objects"])
        return cls(d["id"], d["width"], d["height"], d["background"], objs)


# ----------------------------------------------------------------------------- scenes


def _scene_rng(seed: int, split: str, index: int, stream: str) -> Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and
    # PYTHONHASHSEED; separate streams keep e.g. question sampling from shifting the scenes.
    return Random(f"qbridge-shapes/{seed}/{split}/{index}/{stream}")


def _iou_and_cover(a, b) -> tuple[float, float]:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0, 0.0
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def generate_scene(
    rng: Random, scene_id: int, width: int, height: int, max_objects: int,
    pairs: tuple[tuple[str, str], ...], required_pairs: tuple[tuple[str, str], ...] = (),
) -> Scene:
    """Sample a scene whose colour-shape pairs come from ``pairs``.

    If ``required_pairs`` is given, the first object is one of them (placed on an empty canvas, so
    it always fits). An object that finds no place after 100 tries is dropped.
    """
    n = rng.randint(1, max_objects)
    wanted = [rng.choice(required_pairs)] if required_pairs else []
    wanted += [rng.choice(pairs) for _ in range(n - len(wanted))]
    side = min(width, height)
    objects: list[Obj] = []
    for colour, shape in wanted:
        size = rng.choice(tuple(SIZES))
        lo, hi = SIZES[size]
        diameter = rng.uniform(lo, hi) * side
        ew, eh = _EXTENT[shape]
        w, h = max(4, round(diameter * ew)), max(4, round(diameter * eh))
        for _ in range(100):
            x1, y1 = rng.randint(1, width - w - 1), rng.randint(1, height - h - 1)
            box = (x1, y1, x1 + w, y1 + h)
            if all(
                iou <= MAX_IOU and cover <= MAX_COVER
                for iou, cover in (_iou_and_cover(box, o.box) for o in objects)
            ):
                objects.append(Obj(shape, colour, size, box))
                break
    return Scene(scene_id, width, height, rng.choice(BACKGROUNDS), tuple(objects))


def make_scene(
    seed: int, split: str, index: int, *, width: int = 224, height: int = 224, max_objects: int = 4
) -> Scene:
    """Scene ``index`` of ``split`` for ``seed``: independent of how many scenes are written."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= max_objects <= 10:  # captions spell counts as words, up to "ten"
        raise ValueError(f"max_objects must be in 1..10, got {max_objects}")
    rng = _scene_rng(seed, split, index, "scene")
    if split == "heldout":
        return generate_scene(rng, SPLIT_ID_OFFSET[split] + index + 1, width, height, max_objects,
                              ALL_PAIRS, required_pairs=HELDOUT_PAIRS)
    return generate_scene(rng, SPLIT_ID_OFFSET[split] + index + 1, width, height, max_objects,
                          SEEN_PAIRS)


# ----------------------------------------------------------------------------- rendering


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if shape == "diamond":
        return [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    if shape == "hexagon":
        return [(0.5, 0.0), (1.0, 0.25), (1.0, 0.75), (0.5, 1.0), (0.0, 0.75), (0.0, 0.25)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = np.pi * (-0.5 + k / 5)
            pts.append((r * np.cos(a), r * np.sin(a)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
                for x, y in pts]
    raise ValueError(shape)


def _shape_mask(shape: str, w: int, h: int) -> Image.Image:
    """An L-mode mask of size (w, h) whose filled pixels touch all four edges (a tight box)."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, w - 1, h - 1), fill=255)
    elif shape == "cross":
        tw, th = round(w * 0.34), round(h * 0.34)
        x0, y0 = (w - tw) // 2, (h - th) // 2
        draw.rectangle((0, y0, w - 1, y0 + th - 1), fill=255)
        draw.rectangle((x0, 0, x0 + tw - 1, h - 1), fill=255)
    else:
        draw.polygon([(round(x * (w - 1)), round(y * (h - 1))) for x, y in _unit_polygon(shape)],
                     fill=255)
    return mask


def _background(name: str, width: int, height: int, texture_seed: int) -> Image.Image:
    if name == "grey":
        return Image.new("RGB", (width, height), (128, 128, 128))
    if name == "beige":
        return Image.new("RGB", (width, height), (196, 182, 150))
    if name == "slate":
        return Image.new("RGB", (width, height), (84, 96, 112))
    if name == "gradient":
        t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        top, bottom = np.array([100, 104, 112], np.float32), np.array([176, 172, 164], np.float32)
        arr = np.broadcast_to(top + t * (bottom - top), (height, width, 3))
    elif name == "striped":
        stripe = (np.arange(height) // 6) % 2
        arr = np.where(stripe[:, None, None] == 0, [120, 120, 124], [150, 150, 154])
        arr = np.broadcast_to(arr, (height, width, 3))
    elif name == "checkered":
        cells = (np.arange(height)[:, None] // 16 + np.arange(width)[None, :] // 16) % 2
        arr = np.where(cells[:, :, None] == 0, [176, 164, 140], [150, 140, 120])
    elif name == "noisy":
        rng = np.random.default_rng(texture_seed)
        grain = rng.normal(0.0, 10.0, size=(height, width, 1)).astype(np.float32)
        arr = np.broadcast_to(128.0 + grain, (height, width, 3))
    else:
        raise ValueError(f"unknown background {name!r}")
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw ``scene`` (RGB). Each shape fills its box exactly; later objects are drawn on top. ``fill``: paint
    the shapes on that plain colour instead of the scene's background (the world never draws one; the vision
    tower learns to read them as on grey, and `training.demo.backgrounds` measures the bridge on them)."""
    if fill is None:
        image = _background(scene.background, scene.width, scene.height, texture_seed=scene.id)
    else:
        image = Image.new("RGB", (scene.width, scene.height), tuple(fill))
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        image.paste(COLOURS[obj.colour], (x1, y1), _shape_mask(obj.shape, x2 - x1, y2 - y1))
    return image


# A plain fill hides an object whose colour is this close to it (largest channel difference).
MIN_CONTRAST = 80


def visible_on(scene: Scene, fill: tuple[int, int, int]) -> bool:
    """Every object of ``scene`` stands out from a plain ``fill``."""
    return all(max(abs(a - b) for a, b in zip(COLOURS[o.colour], fill)) >= MIN_CONTRAST for o in scene.objects)


def random_fill(scene: Scene, rng: Random, tries: int = 50) -> tuple[int, int, int]:
    """A plain fill every object of ``scene`` stands out from: a third of the time paper white or black (what
    people draw on; within 20 of them), a third a grey of any lightness, a third any colour; grey 128 (the
    world's own) when ``tries`` draws find none."""
    for _ in range(tries):
        kind = rng.random()
        if kind < 1 / 3:
            v = rng.choice((rng.randint(235, 255), rng.randint(0, 20)))
            fill = (v, v, v)
        elif kind < 2 / 3:
            v = rng.randint(0, 255)
            fill = (v, v, v)
        else:
            fill = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        if visible_on(scene, fill):
            return fill
    return (128, 128, 128)


def encode_png(image: Image.Image) -> bytes:
    # Fixed options (and no metadata) so equal images give equal bytes.
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _phrase(count: int, words: list[str], shape: str) -> str:
    if count == 1:
        return f"{_article(words[0] if words else shape)} {' '.join(words + [shape])}"
    return f"{NUMBER_WORDS[count]} {' '.join(words + [PLURALS[shape]])}"


def reading_order(scene: Scene) -> list[Obj]:
    """The scene's objects in the order captions, scene descriptions and detection targets list them."""
    return sorted(scene.objects, key=lambda o: reading_order_key(o.box, scene.width, scene.height))


def _there_are(n: int) -> str:
    return "there is one shape" if n == 1 else f"there are {NUMBER_WORDS[n]} shapes"


def caption(scene: Scene, level: str) -> str:
    """The clean reference caption of ``scene`` at ``level`` (see the module docstring)."""
    objs = reading_order(scene)
    if level == "brief":
        groups = Counter((o.colour, o.shape) for o in objs)  # insertion order = reading order
        return _join([_phrase(k, [c], s) for (c, s), k in groups.items()])
    if level == "normal":
        groups = Counter((o.size, o.colour, o.shape) for o in objs)
        listed = _join([_phrase(k, [z, c], s) for (z, c, s), k in groups.items()])
        return f"{_there_are(len(objs))}: {listed}."
    if level == "detailed":
        sentences = [f"{_there_are(len(objs))} on a {scene.background} background."]
        sentences += [f"{_phrase(1, [o.size, o.colour], o.shape)} is {POSITION_PHRASES[scene.cell(o)]}."
                      for o in objs]
        return " ".join(sentences)
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def training_captions(
    scene: Scene, rng: Random, noise: float, pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS
) -> list[dict]:
    """One caption per level; each is replaced by web-like noise with probability ``noise``.

    Noise kinds (uniform): ``other_image`` (the clean caption of another random scene),
    ``wrong_attribute`` (one object's colour or shape changed, drawn from ``pairs``),
    ``generic`` (text about no object). Returns ``[{"caption", "level", "noise"}]``.
    """
    out = []
    for level in LEVELS:
        kind = rng.choice(NOISE_KINDS) if rng.random() < noise else "none"
        if kind == "none":
            text = caption(scene, level)
        elif kind == "other_image":
            text = caption(scene, level)
            while text == caption(scene, level):
                other = generate_scene(rng, 0, scene.width, scene.height, 4, pairs)
                text = caption(other, level)
        elif kind == "wrong_attribute":
            text = caption(_corrupt(scene, rng, pairs), level)
        else:
            text = rng.choice(GENERIC_CAPTIONS)
        out.append({"caption": text, "level": level, "noise": kind})
    return out


def _corrupt(scene: Scene, rng: Random, pairs: tuple[tuple[str, str], ...]) -> Scene:
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    options = [(c, o.shape) for c in COLOURS if c != o.colour and (c, o.shape) in pairs]
    if rng.random() < 0.5 or not options:  # change the shape instead
        options = [(o.colour, s) for s in SHAPES if s != o.shape and (o.colour, s) in pairs] or options
    colour, shape = rng.choice(options)
    objs = list(scene.objects)
    objs[i] = Obj(shape, colour, o.size, o.box)
    return Scene(scene.id, scene.width, scene.height, scene.background, tuple(objs))


# ----------------------------------------------------------------------------- questions


# Question type -> VQAv2 answer type.
ANSWER_TYPES = {"count": "number", "colour": "other", "shape": "other", "size": "other",
                "existence": "yes/no", "position": "other"}


def questions(
    scene: Scene, rng: Random, k: int = 5, pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS
) -> list[dict]:
    """Up to ``k`` questions with unambiguous one-word answers, types spread as evenly as possible.

    Types: count, colour, shape, size, existence, position. A question names an object only when
    that name picks out exactly one object; "where is" is asked only for objects whose box centre
    is in one of the five cells a single word names (top, bottom, left, right, center) and at least
    4 % of the image side away from the cell's borders. Negative existence questions name a pair
    from ``pairs``. Returns ``[{"question", "answer", "question_type", "answer_type"}]``.
    """
    objs = scene.objects
    labels = Counter(o.label for o in objs)
    shapes = Counter(o.shape for o in objs)
    colours = Counter(o.colour for o in objs)
    unique = [o for o in objs if labels[o.label] == 1]
    cands: dict[str, list[tuple[str, str]]] = {t: [] for t in ANSWER_TYPES}
    cands["count"].append(("how many shapes are there?", str(len(objs))))
    for c in COLOURS:
        if colours[c] or rng.random() < 0.15:
            cands["count"].append((f"how many {c} shapes are there?", str(colours[c])))
    for s in SHAPES:
        if shapes[s] or rng.random() < 0.15:
            cands["count"].append((f"how many {PLURALS[s]} are there?", str(shapes[s])))
    for o in objs:
        if shapes[o.shape] == 1:
            cands["colour"].append((f"what colour is the {o.shape}?", o.colour))
        if colours[o.colour] == 1:
            cands["shape"].append((f"what shape is the {o.colour} object?", o.shape))
    for o in unique:
        cands["size"].append((f"what size is the {o.label}?", o.size))
        cell = scene.cell(o)
        if cell in POSITION_ANSWERS and _clear_of_borders(scene, o):
            cands["position"].append((f"where is the {o.label}?", POSITION_ANSWERS[cell]))
    absent = [f"{c} {s}" for c, s in pairs if f"{c} {s}" not in labels]
    for label, answer in ((rng.choice(sorted(labels)), "yes"), (rng.choice(absent), "no")):
        cands["existence"].append((f"is there {_article(label)} {label}?", answer))

    types = [t for t in cands if cands[t]]
    rng.shuffle(types)
    for t in types:
        rng.shuffle(cands[t])
    picked: list[dict] = []
    while len(picked) < k and any(cands[t] for t in types):
        for t in types:
            if cands[t] and len(picked) < k:
                q, a = cands[t].pop()
                picked.append({"question": q, "answer": a, "question_type": t,
                               "answer_type": ANSWER_TYPES[t]})
    return picked


def _clear_of_borders(scene: Scene, obj: Obj, margin: float = 0.04) -> bool:
    cx, cy = (obj.box[0] + obj.box[2]) / 2 / scene.width, (obj.box[1] + obj.box[3]) / 2 / scene.height
    return all(abs(v - b) >= margin for v in (cx, cy) for b in (1 / 3, 2 / 3))


# ----------------------------------------------------------------------------- caption metrics


@dataclass(frozen=True)
class Mention:
    """One object a caption claims; ``None`` = not stated."""
    colour: str | None
    shape: str | None
    size: str | None = None
    row: str | None = None
    col: str | None = None

    def fits(self, scene: Scene, obj: Obj) -> bool:
        row, col = scene.cell(obj)
        return all(want is None or want == have for want, have in (
            (self.colour, obj.colour), (self.shape, obj.shape), (self.size, obj.size),
            (self.row, row), (self.col, col)))


_SHAPE_WORDS = {**{s: (s, False) for s in SHAPES}, **{PLURALS[s]: (s, True) for s in SHAPES},
                "shape": (None, False), "shapes": (None, True), "object": (None, False),
                "objects": (None, True)}
_COUNT_WORDS = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBER_WORDS) if i}}
_POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre", "middle"}


def parse_caption(text: str) -> list[Mention]:
    """Object mentions in ``text``, read with the world's grammar; one Mention per claimed object.

    A mention is a shape noun (``circle``, ``squares``, or ``shape``/``object`` after a colour)
    with the count, size and colour words directly before it, and optionally a position phrase
    right after it (``[is|are] in|on|at the <top|bottom|left|right|center|middle...>``). A count
    of k (``two red circles``) gives k mentions; a plural without a count gives two. Phrases
    with neither colour nor concrete shape (``three shapes``) claim no object and are ignored.
    Position words constrain one axis each (``on the left`` = left column, any row); ``center``
    alone means the middle cell.
    """
    tokens = re.findall(r"[a-z]+|\d+", text.lower())
    mentions: list[Mention] = []
    for i, tok in enumerate(tokens):
        if tok not in _SHAPE_WORDS:
            continue
        shape, plural = _SHAPE_WORDS[tok]
        colour = size = None
        count = 2 if plural else 1
        j = i - 1
        while j >= 0:
            word = tokens[j]
            if word in COLOURS and colour is None:
                colour = word
            elif word in SIZES and size is None:
                size = word
            elif word in _COUNT_WORDS or word.isdigit():
                count = _COUNT_WORDS[word] if word in _COUNT_WORDS else int(word)
                break
            else:
                break
            j -= 1
        if colour is None and shape is None:
            continue
        row, col = _parse_position(tokens, i + 1)
        mentions += [Mention(colour, shape, size, row, col)] * min(count, 100)
    return mentions


def _parse_position(tokens: list[str], j: int) -> tuple[str | None, str | None]:
    if j < len(tokens) and tokens[j] in ("is", "are"):
        j += 1
    if j + 1 >= len(tokens) or tokens[j] not in ("in", "on", "at") or tokens[j + 1] != "the":
        return None, None
    words = set()
    j += 2
    while j < len(tokens) and tokens[j] in _POSITION_WORDS and len(words) < 2:
        words.add(tokens[j])
        j += 1
    row = next((w for w in ("top", "bottom") if w in words), None)
    col = next((w for w in ("left", "right") if w in words), None)
    if words & {"center", "centre", "middle"}:
        if row is None and col is None:
            row, col = "middle", "center"
        elif row is None:
            row = "middle"
        elif col is None:
            col = "center"
    return row, col


def caption_precision_recall(caption: str, scene: Scene) -> tuple[float, float]:
    """Scene-grounded precision and recall of a caption.

    Mentions come from :func:`parse_caption`. A mention is *correct* when it is paired with an
    object of the scene that has every attribute the mention states (colour, shape, size,
    position cell; unstated attributes are free). Pairing is one-to-one and maximal (bipartite
    matching), so "two red circles" in a scene with one red circle gets one correct mention.

    * precision = correct mentions / all mentions (0.0 when the caption mentions nothing, so
      generic text does not score as precise);
    * recall = objects paired with a mention / objects in the scene.

    Count-only phrases ("three shapes") and the background are not scored.
    """
    mentions = parse_caption(caption)
    objs = scene.objects
    if not mentions:
        return 0.0, 0.0
    fits = [[j for j, o in enumerate(objs) if m.fits(scene, o)] for m in mentions]
    owner: dict[int, int] = {}  # object index -> mention index

    def augment(i: int, seen: set[int]) -> bool:
        for j in fits[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    matched = sum(augment(i, set()) for i in range(len(mentions)))
    return matched / len(mentions), (matched / len(objs) if objs else 0.0)


# ----------------------------------------------------------------------------- writer


def _dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n")


class _ShardWriter:
    """WebDataset tar shards with fixed metadata, so equal samples give equal bytes."""

    def __init__(self, directory: Path, split: str, max_samples: int):
        self.directory, self.split, self.max_samples = directory, split, max_samples
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.shards = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None or self.count == self.max_samples:
            self.close()
            path = self.directory / f"{self.split}-{self.shards:06d}.tar"
            self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self.shards += 1
            self.count = 0
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


_OWNED = ("images", "shards", "world.json") + tuple(
    f"{kind}_{split}.json" for split in SPLITS
    for kind in ("captions", "questions", "annotations_vqa", "instances", "scenes"))


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    noise: float = 0.0,
    *,
    n_val: int | None = None,
    n_test: int | None = None,
    n_heldout: int | None = None,
    size: tuple[int, int] = (224, 224),
    max_objects: int = 4,
    questions_per_image: int = 5,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Write the shapes world to ``out_dir``; returns the number of images per split.

    ``n`` train scenes; ``n_val``/``n_test``/``n_heldout`` default to ``max(1, n // 10)``.
    ``size`` is (width, height). Train captions get noise at rate ``noise``; other splits are clean.
    Refuses a non-empty ``out_dir`` unless ``overwrite`` (which removes only what this writer
    writes). Layout, per split ``<s>``::

        world.json                    vocabulary, held-out pairs, categories, arguments
        images/<s>/<image_id:012d>.png
        captions_<s>.json             COCO captions (+ "level", "noise" per annotation)
        questions_<s>.json            VQAv2 questions
        annotations_vqa_<s>.json      VQAv2 annotations (10 identical answers)
        instances_<s>.json            COCO instances (bbox xywh; one category per "colour shape")
        scenes_<s>.json               full scene descriptions (Scene.to_dict + file_name)
        shards/<s>-000000.tar         WebDataset: <key>.png + <key>.json, <= shard_size samples
    """
    width, height = size
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if not 1 <= max_objects <= 10:
        raise ValueError(f"max_objects must be in 1..10, got {max_objects}")
    if min(width, height) < 32:
        raise ValueError(f"image size must be at least 32x32, got {width}x{height}")
    default = max(1, n // 10)
    counts = {"train": n, "val": default if n_val is None else n_val,
              "test": default if n_test is None else n_test,
              "heldout": default if n_heldout is None else n_heldout}
    for split, count in counts.items():
        if not 0 <= count < 10_000_000:
            raise ValueError(f"{split} size must be in [0, 10_000_000), got {count}")

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
        for name in _OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    info = {"description": "qbridge shapes world", "version": str(WORLD_VERSION), "year": 2025,
            "contributor": "qbridge", "url": "", "date_created": "2025-01-01"}

    _dump_json(out / "world.json", {
        "version": WORLD_VERSION, "seed": seed, "noise": noise, "width": width, "height": height,
        "max_objects": max_objects, "splits": counts, "shapes": list(SHAPES),
        "colours": {k: list(v) for k, v in COLOURS.items()}, "sizes": list(SIZES),
        "backgrounds": list(BACKGROUNDS), "levels": list(LEVELS),
        "heldout_pairs": [f"{c} {s}" for c, s in HELDOUT_PAIRS], "categories": list(CATEGORIES),
    })

    bar = tqdm(total=sum(counts.values()), desc="shapes world", unit="img", disable=not progress)
    for split, count in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        pairs = ALL_PAIRS if split == "heldout" else SEEN_PAIRS
        images, caps, qs, vqa, boxes, scenes = [], [], [], [], [], []
        shards = _ShardWriter(out / "shards", split, shard_size)
        for index in range(count):
            scene = make_scene(seed, split, index, width=width, height=height, max_objects=max_objects)
            file_name = f"{scene.id:012d}.png"
            png = encode_png(render(scene))
            (out / "images" / split / file_name).write_bytes(png)
            images.append({"id": scene.id, "file_name": file_name, "width": width, "height": height})

            rng = _scene_rng(seed, split, index, "captions")
            sample_caps = training_captions(scene, rng, noise if split == "train" else 0.0, pairs)
            for k, c in enumerate(sample_caps):
                caps.append({"id": scene.id * 10 + k, "image_id": scene.id, **c})

            rng = _scene_rng(seed, split, index, "questions")
            sample_qs = questions(scene, rng, questions_per_image, pairs)
            for k, q in enumerate(sample_qs):
                q["question_id"] = scene.id * 1000 + k
                qs.append({"image_id": scene.id, "question": q["question"], "question_id": q["question_id"]})
                vqa.append({
                    "question_id": q["question_id"], "image_id": scene.id,
                    "question_type": q["question_type"], "answer_type": q["answer_type"],
                    "multiple_choice_answer": q["answer"],
                    "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": a + 1}
                                for a in range(10)],
                })

            for k, o in enumerate(scene.objects):
                x1, y1, x2, y2 = o.box
                boxes.append({"id": scene.id * 100 + k, "image_id": scene.id,
                              "category_id": CATEGORY_ID[o.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                              "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            scenes.append({**scene.to_dict(), "file_name": file_name})

            sample = {"image_id": scene.id, "width": width, "height": height,
                      "background": scene.background, "captions": sample_caps, "questions": sample_qs,
                      "objects": [{**o.to_dict(), "label": o.label} for o in scene.objects]}
            shards.add(f"{scene.id:012d}", {
                "png": png,
                "json": json.dumps(sample, sort_keys=True, separators=(",", ":")).encode(),
            })
            bar.update()
        shards.close()

        _dump_json(out / f"captions_{split}.json",
                   {"info": info, "licenses": [], "images": images, "annotations": caps})
        _dump_json(out / f"instances_{split}.json",
                   {"info": info, "licenses": [], "images": images, "annotations": boxes,
                    "categories": list(CATEGORIES)})
        _dump_json(out / f"questions_{split}.json",
                   {"info": info, "license": {}, "task_type": "Open-Ended", "data_type": "shapes",
                    "data_subtype": split, "questions": qs})
        _dump_json(out / f"annotations_vqa_{split}.json",
                   {"info": info, "license": {}, "data_type": "shapes", "data_subtype": split,
                    "annotations": vqa})
        _dump_json(out / f"scenes_{split}.json", {"split": split, "seed": seed, "scenes": scenes})
    bar.close()
    return counts


# ----------------------------------------------------------------------------- CLI


def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like 224x224 (WIDTHxHEIGHT), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    """``qbridge data ...``: argv starts after ``data`` (e.g. ``["shapes", "--out", "d"]``)."""
    parser = argparse.ArgumentParser(prog="qbridge data", description="Generate datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "shapes", help="write the procedural shapes world (COCO, VQAv2 and WebDataset formats)",
        description="Write the shapes world: train/val/test/heldout splits as COCO captions, "
                    "VQAv2 questions/annotations, COCO instances and WebDataset shards. "
                    "The same arguments give byte-identical files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    p.add_argument("--n", type=int, default=1000, help="number of train scenes")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--noise", type=float, default=0.0,
                   help="fraction of train captions replaced by web-like noise (0..1); "
                        "val/test/heldout are always clean")
    p.add_argument("--n-val", type=int, default=None, help="val scenes (default: max(1, n // 10))")
    p.add_argument("--n-test", type=int, default=None, help="test scenes (default: max(1, n // 10))")
    p.add_argument("--n-heldout", type=int, default=None,
                   help="compositional held-out scenes (default: max(1, n // 10))")
    p.add_argument("--size", type=_parse_size, default=(224, 224), metavar="WxH",
                   help="image size, width x height")
    p.add_argument("--max-objects", type=int, default=4, help="objects per scene: 1..this")
    p.add_argument("--questions-per-image", type=int, default=5, help="VQA questions per scene")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier shapes world in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        counts = write_dataset(
            args.out, args.n, args.seed, args.noise, n_val=args.n_val, n_test=args.n_test,
            n_heldout=args.n_heldout, size=args.size, max_objects=args.max_objects,
            questions_per_image=args.questions_per_image, shard_size=args.shard_size,
            overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    print(f"wrote {args.out}: " + ", ".join(f"{s} {c}" for s, c in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
