"""A synthetic multimodal task: coloured shapes on a grid, and question families that need the image.

Each image is a ``grid x grid`` board (black background) with 1-4 objects, each a coloured shape in its
own cell. Question families (all answers are one word):

* ``colors``     "what colors are there ?"                       -> e.g. "blue red" (sorted)
* ``shapes``     "what shapes are there ?"                       -> e.g. "circle square" (sorted)
* ``anycolor``   "is there a red shape ?"                        -> yes / no
* ``nocolor``    "is there no red shape ?"                       -> yes / no
* ``bothcolors`` "is there a red shape and a blue shape ?"       -> yes / no
* ``missing``    "which color is missing ?"  (3 of the 4 colours shown) -> the fourth colour
* ``anyshape``   "is there a circle ?"                           -> yes / no
* ``colorat``    "what color is the shape at the top left ?"     -> red / green / blue / yellow
* ``color``    "what color is the circle ?"                       -> red / green / blue / yellow
* ``isat``       "is the shape at the top left red ?"            -> yes / no
* ``shape``    "what shape is at the top left ?"                   -> circle / square / triangle
* ``exist``    "is there a blue triangle ?"                        -> yes / no
* ``countall``   "how many shapes are there ?"                   -> one / two / three / four
* ``count``    "how many red shapes are there ?"                   -> zero / one / two / three / four
* ``leftright``  "is the red shape left of the blue shape ?"     -> yes / no
* ``abovebelow`` "is the red shape above the blue shape ?"       -> yes / no

Generation is deterministic per (seed, split); splits use disjoint seeds. Examples are
:class:`~skipvlm.data.chat.ChatExample` s with PIL images, ready for the collator.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from skipvlm.data.chat import ChatExample

__all__ = ["FAMILIES", "SyntheticBatches", "SyntheticTask", "vocabulary"]

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (50, 80, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
FAMILIES = (
    "colors", "shapes", "anycolor", "nocolor", "bothcolors", "missing", "anyshape", "colorat", "isat",
    "shape", "countall", "color", "exist", "count", "leftright", "abovebelow",
)  # fmt: skip
_SPLIT_SEEDS = ("train", "val", "test")


def _position_names(grid: int) -> dict[tuple[int, int], str]:
    rows = ["top", "middle", "bottom"] if grid == 3 else [f"row{r}" for r in range(grid)]
    cols = ["left", "center", "right"] if grid == 3 else [f"col{c}" for c in range(grid)]
    return {(r, c): f"{rows[r]} {cols[c]}" for r in range(grid) for c in range(grid)}


def vocabulary(grid: int = 3) -> list[str]:
    """Every word the prompts, templates and answers of this task use (for a word-level tokenizer)."""
    words = [
        "user", "assistant", ":", "?", "what", "color", "is", "the", "shape", "at", "there", "a", "how",
        "many", "shapes", "are", "left", "of", "above", "yes", "no", "none", "and", "which", "missing",
        "colors",
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
        minimum = {"leftright": 2, "abovebelow": 2, "missing": 3}.get(family, 1)
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

    def _q_colors(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return "what colors are there ?", " ".join(sorted({o.colour for o in objects}))

    def _q_shapes(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return "what shapes are there ?", " ".join(sorted({o.shape for o in objects}))

    def _q_anycolor(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        present = {o.colour for o in objects}
        want = rng.random() < 0.5
        pool = sorted(present) if want else sorted(set(COLOURS) - present)
        return (f"is there a {rng.choice(pool)} shape ?", "yes" if want else "no") if pool else None

    def _q_nocolor(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        question, answer = self._q_anycolor(rng, objects) or ("", "")
        colour = question.split()[3] if question else None
        return (f"is there no {colour} shape ?", "no" if answer == "yes" else "yes") if colour else None

    def _q_bothcolors(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        present, absent = (
            sorted({o.colour for o in objects}),
            sorted(set(COLOURS) - {o.colour for o in objects}),
        )
        if rng.random() < 0.5:  # both present (redraw the board if it has one colour only)
            if len(present) < 2:
                return None
            a, b = rng.sample(present, 2)
        else:  # one of them absent
            if not absent:
                return None
            a, b = rng.choice(present), rng.choice(absent)
            if rng.random() < 0.5:
                a, b = b, a
        answer = "yes" if a in present and b in present else "no"
        return f"is there a {a} shape and a {b} shape ?", answer

    def _q_missing(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        absent = sorted(set(COLOURS) - {o.colour for o in objects})
        return ("which color is missing ?", absent[0]) if len(absent) == 1 else None

    def _q_anyshape(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        present = {o.shape for o in objects}
        want = rng.random() < 0.5
        pool = sorted(present) if want else sorted(set(SHAPES) - present)
        return (f"is there a {rng.choice(pool)} ?", "yes" if want else "no") if pool else None

    def _q_colorat(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        target = rng.choice(objects)
        return (
            f"what color is the shape at the {_position_names(self.grid)[(target.row, target.col)]} ?",
            target.colour,
        )

    def _q_isat(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        target = rng.choice(objects)
        colour = target.colour if rng.random() < 0.5 else rng.choice(sorted(set(COLOURS) - {target.colour}))
        where = _position_names(self.grid)[(target.row, target.col)]
        return f"is the shape at the {where} {colour} ?", "yes" if colour == target.colour else "no"

    def _q_shape(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        target = rng.choice(objects)
        return f"what shape is at the {_position_names(self.grid)[(target.row, target.col)]} ?", target.shape

    def _q_exist(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        if rng.random() < 0.5:
            return f"is there a {rng.choice(objects).name} ?", "yes"
        present = {o.name for o in objects}
        absent = [f"{c} {s}" for c in sorted(COLOURS) for s in SHAPES if f"{c} {s}" not in present]
        return f"is there a {rng.choice(absent)} ?", "no"

    def _q_countall(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return "how many shapes are there ?", NUMBERS[len(objects)]

    def _q_count(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        colour = (
            rng.choice([o.colour for o in objects]) if rng.random() < 0.8 else rng.choice(sorted(COLOURS))
        )
        return f"how many {colour} shapes are there ?", NUMBERS[sum(o.colour == colour for o in objects)]

    def _relation(
        self, rng: random.Random, objects: list[_Object], axis: str, word: str
    ) -> tuple[str, str] | None:
        colours = [o.colour for o in objects]
        named = [o for o in objects if colours.count(o.colour) == 1]  # objects are named by a unique colour
        pairs = [(a, b) for a in named for b in named if getattr(a, axis) != getattr(b, axis)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        answer = "yes" if getattr(a, axis) < getattr(b, axis) else "no"
        return f"is the {a.colour} shape {word} the {b.colour} shape ?", answer

    def _q_leftright(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return self._relation(rng, objects, "col", "left of")

    def _q_abovebelow(self, rng: random.Random, objects: list[_Object]) -> tuple[str, str] | None:
        return self._relation(rng, objects, "row", "above")


class SyntheticBatches(Sequence):
    """``num_batches`` collated batches of a task split, built on access (nothing held in memory).

    Batch ``i`` holds examples ``i * batch_size ...``; the same index always gives the same batch.
    """

    def __init__(
        self,
        task: SyntheticTask,
        collator: Any,
        num_batches: int,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
    ):
        self.task, self.collator, self.num_batches, self.batch_size = task, collator, num_batches, batch_size
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        start = index * self.batch_size
        examples = [self.task.example(start + j, self.split, self.seed) for j in range(self.batch_size)]
        return self.collator(examples)
