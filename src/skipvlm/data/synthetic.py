"""A synthetic multimodal task: coloured shapes on a grid, and question families that need the image.

Each image is a ``grid x grid`` board (black background) with 1-4 objects, each a coloured shape in its
own cell. Question families (all answers are one word):

* ``color``    "what color is the circle ?"                       -> red / green / blue / yellow
* ``shape``    "what shape is at the top left ?"                   -> circle / square / triangle
* ``exist``    "is there a blue triangle ?"                        -> yes / no
* ``count``    "how many red shapes are there ?"                   -> zero / one / two / three / four
* ``leftright``  "is the red circle left of the blue square ?"    -> yes / no
* ``abovebelow`` "is the red circle above the blue square ?"      -> yes / no

Generation is deterministic per (seed, split); splits use disjoint seeds. Examples are
:class:`~skipvlm.data.chat.ChatExample` s with PIL images, ready for the collator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from skipvlm.data.chat import ChatExample

__all__ = ["FAMILIES", "SyntheticTask", "vocabulary"]

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (50, 80, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
FAMILIES = ("color", "shape", "exist", "count", "leftright", "abovebelow")
_SPLIT_SEEDS = ("train", "val", "test")


def _position_names(grid: int) -> dict[tuple[int, int], str]:
    rows = ["top", "middle", "bottom"] if grid == 3 else [f"row{r}" for r in range(grid)]
    cols = ["left", "center", "right"] if grid == 3 else [f"col{c}" for c in range(grid)]
    return {(r, c): f"{rows[r]} {cols[c]}" for r in range(grid) for c in range(grid)}


def vocabulary(grid: int = 3) -> list[str]:
    """Every word the prompts, templates and answers of this task use (for a word-level tokenizer)."""
    words = [
        "user", "assistant", ":", "?", "what", "color", "is", "the", "shape", "at", "there", "a", "how",
        "many", "shapes", "are", "left", "of", "above", "yes", "no", "none",
    ]  # fmt: skip
    words += [*COLOURS, *SHAPES, *NUMBERS]
    for name in _position_names(grid).values():
        words += name.split()
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SyntheticTask:
    """Generator of examples for some question families.

    Args:
        families: which question families to draw from (uniformly).
        grid: cells per side.
        image_size: image side in pixels.
        max_objects: at most this many objects per image (at least 1; 2 for relation questions).
    """

    families: tuple[str, ...] = FAMILIES
    grid: int = 3
    image_size: int = 48
    max_objects: int = 4

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"unknown question families {unknown}; choose from {FAMILIES}")
        if not 2 <= self.max_objects <= min(4, self.grid * self.grid):
            raise ValueError(
                f"max_objects must be in 2..{min(4, self.grid * self.grid)}, got {self.max_objects}"
            )

    def examples(self, n: int, split: str = "train", seed: int = 0) -> list[ChatExample]:
        """``n`` examples of ``split`` (``train``, ``val`` or ``test``), deterministic for ``seed``."""
        return [self.example(i, split, seed) for i in range(n)]

    def example(self, index: int, split: str = "train", seed: int = 0) -> ChatExample:
        """Example number ``index`` of ``split``: the same for the same arguments, in any order."""
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"split must be one of {_SPLIT_SEEDS}, got {split!r}")
        rng = random.Random(f"{seed}-{split}-{','.join(self.families)}-{index}")
        family = self.families[index % len(self.families)]
        minimum = 2 if family in ("leftright", "abovebelow") else 1
        qa = None
        while qa is None:  # some boards cannot carry a question (e.g. no unique shape): redraw
            objects = self._board(rng, minimum)
            qa = getattr(self, f"_q_{family}")(rng, objects)
        meta = {"family": family, "objects": [o.__dict__ for o in objects]}
        return ChatExample(qa[0], qa[1], self.render(objects), id=f"{split}-{seed}-{index}", meta=meta)

    # --- boards and images ---------------------------------------------------------------------

    def _board(self, rng: random.Random, minimum: int) -> list[_Object]:
        every = [(r, c) for r in range(self.grid) for c in range(self.grid)]
        cells = rng.sample(every, rng.randint(minimum, self.max_objects))
        return [_Object(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), r, c) for r, c in cells]

    def render(self, objects: list[_Object]) -> Image.Image:
        """The board as an RGB image."""
        image = Image.new("RGB", (self.image_size, self.image_size), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        cell = self.image_size / self.grid
        pad = cell * 0.18
        for o in objects:
            x0, y0 = o.col * cell + pad, o.row * cell + pad
            x1, y1 = (o.col + 1) * cell - pad, (o.row + 1) * cell - pad
            fill = COLOURS[o.colour]
            if o.shape == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            elif o.shape == "square":
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return image

    # --- question families ------------------------------------------------------------------------

    def _q_color(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        return f"what color is the {target.shape} ?", target.colour

    def _q_shape(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        target = rng.choice(objects)
        return f"what shape is at the {_position_names(self.grid)[(target.row, target.col)]} ?", target.shape

    def _q_exist(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        if rng.random() < 0.5:
            return f"is there a {rng.choice(objects).name} ?", "yes"
        present = {o.name for o in objects}
        absent = [f"{c} {s}" for c in sorted(COLOURS) for s in SHAPES if f"{c} {s}" not in present]
        return f"is there a {rng.choice(absent)} ?", "no"

    def _q_count(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        colour = (
            rng.choice([o.colour for o in objects]) if rng.random() < 0.8 else rng.choice(sorted(COLOURS))
        )
        return f"how many {colour} shapes are there ?", NUMBERS[sum(o.colour == colour for o in objects)]

    def _relation(
        self, rng: random.Random, objects: list[_Object], axis: str, word: str
    ) -> tuple[str, str] | None:
        names = [o.name for o in objects]
        named = [o for o in objects if names.count(o.name) == 1]  # refer only to unambiguous objects
        pairs = [(a, b) for a in named for b in named if getattr(a, axis) != getattr(b, axis)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return f"is the {a.name} {word} the {b.name} ?", "yes" if getattr(a, axis) < getattr(
            b, axis
        ) else "no"

    def _q_leftright(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return self._relation(rng, objects, "col", "left of")

    def _q_abovebelow(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return self._relation(rng, objects, "row", "above")
