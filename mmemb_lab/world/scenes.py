"""Primitives of the toy world: grid scenes, short videos and glyph pages, and how they are drawn.

Concept
    The toy world (docs/method.md, "The toy world") is a procedurally generated stand-in for MMEB-V2 with
    ground truth. Its atoms are deliberately tiny so that a ~2.5M-parameter Qwen-VL learns to *see*
    them in minutes on a CPU:

    - a **scene** is a 3x3 grid of 32-pixel cells (96x96 image), each empty or holding one object
      (a colour and a shape);
    - a **video** is a few scenes ("frames") where exactly one object appears, leaves or moves
      between consecutive frames;
    - a **page** (visual document) is a 2-column, 4-row table of glyphs (64x128 image): a letter key
      and a digit value per row.

Intuition
    One 32x32 cell is exactly one merged image token of a Qwen3-VL backbone (patch 16, spatial merge
    2), so "what is at a cell" is a per-token lookup - the atomic skill every harder question chains
    (aligning the world with the patches is what let a tiny model learn to see: docs/research-log.md,
    Prototypes).

Used by: ``mmemb_lab.world.tasks`` (datasets), the stage-0 foundation (dense descriptions, per-token
attribute labels) and notebook 01.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 32  # pixels per grid cell == one merged image token at patch 16, merge 2
GRID = 3  # scenes are GRID x GRID cells
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS = (
    "top-left", "top-middle", "top-right",
    "middle-left", "centre", "middle-right",
    "bottom-left", "bottom-middle", "bottom-right",
)
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "above": (-1, 0), "below": (1, 0)}
LETTERS = tuple("ABCDEFGH")
DIGITS = tuple("0123456789")
PAGE_ROWS = 4
ORDINALS = ("one", "two", "three", "four", "five")

_RGB = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (160, 60, 200), "orange": (250, 140, 20),
}
_BACKGROUND = (24, 24, 24)
_PAGE_BACKGROUND = (245, 245, 240)

# Classes of the per-token attribute head (stage 0): empty, every colour-shape object, every glyph.
OBJECT_CLASSES = ("empty",) + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
GLYPH_CLASSES = LETTERS + DIGITS
TOKEN_CLASSES = OBJECT_CLASSES + tuple(f"glyph {g}" for g in GLYPH_CLASSES)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A 3x3 grid; ``cells[i]`` is the object at ``POSITIONS[i]`` or None."""

    cells: tuple[Obj | None, ...]

    def objects(self) -> list[tuple[int, Obj]]:
        return [(i, o) for i, o in enumerate(self.cells) if o is not None]

    def where(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        return [i for i, o in self.objects()
                if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]

    def describe(self) -> str:
        """Dense description, one clause per cell (the stage-0 target that teaches seeing)."""
        return " ".join(f"{POSITIONS[i]} {o.name if o else 'empty'}." for i, o in enumerate(self.cells))

    def token_labels(self) -> list[int]:
        """Per-merged-image-token class ids (raster order), for the auxiliary attribute head."""
        return [OBJECT_CLASSES.index(o.name) if o else 0 for o in self.cells]


@dataclass(frozen=True)
class Event:
    kind: str  # "appears" | "leaves" | "moves"
    obj: Obj
    src: int | None
    dst: int | None

    def describe(self) -> str:
        if self.kind == "appears":
            return f"{self.obj.name} appears at {POSITIONS[self.dst]}."
        if self.kind == "leaves":
            return f"{self.obj.name} leaves {POSITIONS[self.src]}."
        return f"{self.obj.name} moves from {POSITIONS[self.src]} to {POSITIONS[self.dst]}."


@dataclass(frozen=True)
class Video:
    frames: tuple[Scene, ...]
    events: tuple[Event, ...]  # events[t] turns frames[t] into frames[t + 1]


@dataclass(frozen=True)
class Page:
    """A visual document: ``rows[i] = (letter, digit)``, letters distinct."""

    rows: tuple[tuple[str, str], ...]

    def value(self, letter: str) -> str | None:
        return next((d for k, d in self.rows if k == letter), None)

    def describe(self) -> str:
        return " ".join(f"row {ORDINALS[i]} {k} is {d}." for i, (k, d) in enumerate(self.rows))

    def token_labels(self) -> list[int]:
        base = len(OBJECT_CLASSES)
        return [base + GLYPH_CLASSES.index(g) for row in self.rows for g in row]


# ---------------------------------------------------------------------------------------------
# grid geometry


def step(pos: int, direction: str) -> int | None:
    """The cell next to ``pos`` in ``direction``, or None off the grid."""
    dr, dc = DIRECTIONS[direction]
    r, c = divmod(pos, GRID)
    r, c = r + dr, c + dc
    return r * GRID + c if 0 <= r < GRID and 0 <= c < GRID else None


def colour_after(colour: str) -> str:
    return COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]


def letter_after(letter: str) -> str:
    return LETTERS[(LETTERS.index(letter) + 1) % len(LETTERS)]


# ---------------------------------------------------------------------------------------------
# sampling


def random_obj(rng: np.random.Generator) -> Obj:
    return Obj(COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))])


def random_scene(rng: np.random.Generator, n_min: int = 2, n_max: int = 6) -> Scene:
    n = int(rng.integers(n_min, n_max + 1))
    cells: list[Obj | None] = [None] * GRID * GRID
    for pos in rng.choice(GRID * GRID, size=n, replace=False):
        cells[int(pos)] = random_obj(rng)
    return Scene(tuple(cells))


def random_page(rng: np.random.Generator) -> Page:
    letters = rng.choice(len(LETTERS), size=PAGE_ROWS, replace=False)
    return Page(tuple((LETTERS[int(k)], DIGITS[int(rng.integers(10))]) for k in letters))


def random_event(rng: np.random.Generator, scene: Scene) -> tuple[Event, Scene]:
    """One change to ``scene``: an object appears, leaves or moves to an empty cell."""
    cells = list(scene.cells)
    empty = [i for i, o in enumerate(cells) if o is None]
    full = [i for i, o in enumerate(cells) if o is not None]
    kinds = [k for k, ok in (("appears", bool(empty) and len(full) < 7), ("leaves", len(full) > 2),
                             ("moves", bool(empty) and bool(full))) if ok]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "appears":
        dst = int(rng.choice(empty))
        obj = random_obj(rng)
        cells[dst] = obj
        return Event(kind, obj, None, dst), Scene(tuple(cells))
    src = int(rng.choice(full))
    obj = cells[src]
    cells[src] = None
    if kind == "leaves":
        return Event(kind, obj, src, None), Scene(tuple(cells))
    dst = int(rng.choice(empty))
    cells[dst] = obj
    return Event(kind, obj, src, dst), Scene(tuple(cells))


def random_video(rng: np.random.Generator, n_frames: int = 3) -> Video:
    frames = [random_scene(rng, 2, 5)]
    events = []
    for _ in range(n_frames - 1):
        ev, nxt = random_event(rng, frames[-1])
        events.append(ev)
        frames.append(nxt)
    return Video(tuple(frames), tuple(events))


# ---------------------------------------------------------------------------------------------
# rendering (deterministic: no antialiasing randomness, fixed geometry)


def _draw_obj(draw: ImageDraw.ImageDraw, x0: int, y0: int, obj: Obj) -> None:
    m, s = 5, CELL - 10  # margin and size inside the cell
    box = (x0 + m, y0 + m, x0 + m + s, y0 + m + s)
    fill = _RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + CELL // 2, y0 + m), (x0 + m, y0 + m + s), (x0 + m + s, y0 + m + s)], fill=fill)
    elif obj.shape == "star":
        cx, cy, ro, ri = x0 + CELL / 2, y0 + CELL / 2, s / 2, s / 5
        pts = [(cx + (ro if k % 2 == 0 else ri) * np.sin(k * np.pi / 5),
                cy - (ro if k % 2 == 0 else ri) * np.cos(k * np.pi / 5)) for k in range(10)]
        draw.polygon([(round(px), round(py)) for px, py in pts], fill=fill)
    elif obj.shape == "cross":
        t = 4
        c = CELL // 2
        draw.rectangle((x0 + c - t, y0 + m, x0 + c + t, y0 + m + s), fill=fill)
        draw.rectangle((x0 + m, y0 + c - t, x0 + m + s, y0 + c + t), fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(obj.shape)


def render_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (GRID * CELL, GRID * CELL), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, obj in scene.objects():
        r, c = divmod(i, GRID)
        _draw_obj(draw, c * CELL, r * CELL, obj)
    return img


def render_object(obj: Obj) -> Image.Image:
    """A single-cell crop (32x32): the candidates of grounding tasks."""
    img = Image.new("RGB", (CELL, CELL), _BACKGROUND)
    _draw_obj(ImageDraw.Draw(img), 0, 0, obj)
    return img


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=26)


def render_page(page: Page) -> Image.Image:
    img = Image.new("RGB", (2 * CELL, PAGE_ROWS * CELL), _PAGE_BACKGROUND)
    draw = ImageDraw.Draw(img)
    for r, (k, d) in enumerate(page.rows):
        for c, glyph in enumerate((k, d)):
            draw.text((c * CELL + CELL / 2, r * CELL + CELL / 2), glyph, fill=(10, 10, 10) if c else (20, 20, 150),
                      font=_font(), anchor="mm")
        draw.line((0, (r + 1) * CELL - 1, 2 * CELL, (r + 1) * CELL - 1), fill=(200, 200, 200))
    return img
