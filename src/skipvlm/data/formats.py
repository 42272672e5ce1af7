"""Loaders for the formats the field uses: LLaVA conversations, ScienceQA, Hugging Face datasets.

Every loader streams its rows, validates each one, and either skips a bad row (recording file, row
and reason in a :class:`LoadReport`) or stops at it, as ``on_bad_row`` says. A row is bad when a
field is missing, its image is missing or unreadable, its answer is empty, or it is longer than
``max_chars``. Images are opened and verified at load time, so a training run never meets a broken
image halfway through.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from skipvlm.data.chat import ChatExample

__all__ = [
    "BadRow",
    "BadRowError",
    "LoadReport",
    "load_chat_jsonl",
    "load_hf_dataset",
    "load_jsonl",
    "load_llava",
    "load_scienceqa",
]

logger = logging.getLogger(__name__)

POLICIES = ("skip", "fail")
SCIENCEQA_FORMATS = ("QCM-A", "QCM-ALE")
_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class BadRow:
    """Where a bad row is and what is wrong with it."""

    file: str
    row: int | str
    reason: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}"


class BadRowError(ValueError):
    """A bad row under ``on_bad_row="fail"``."""


@dataclass
class LoadReport:
    """The examples a loader produced and the rows it skipped."""

    examples: list[ChatExample] = field(default_factory=list)
    skipped: list[BadRow] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.examples)} examples, skipped {len(self.skipped)} bad rows"]
        lines += [f"  {bad}" for bad in self.skipped]
        return "\n".join(lines)


class _Checker:
    """Applies the bad-row policy and the shared validations."""

    def __init__(self, file: str, on_bad_row: str, max_chars: int | None):
        if on_bad_row not in POLICIES:
            raise ValueError(f"on_bad_row must be one of {POLICIES}, got {on_bad_row!r}")
        self.file, self.on_bad_row, self.max_chars = file, on_bad_row, max_chars
        self.report = LoadReport()

    def bad(self, row: int | str, reason: str) -> None:
        bad = BadRow(self.file, row, reason)
        if self.on_bad_row == "fail":
            raise BadRowError(f"{bad} (pass on_bad_row='skip' / --on-bad-row skip to skip such rows)")
        logger.warning("skipping %s", bad)
        self.report.skipped.append(bad)

    def image(self, row: int | str, image: Any, folder: Path | None = None) -> Any | None:
        """A decodable image (PIL image or path), or ``None`` after reporting the row as bad.

        A path given as a string resolves against ``folder`` and must stay inside it (``../`` may not
        leave the image folder; absolute paths are taken as they are). The image is decoded once here,
        so a file with valid checksums but broken pixel data is a bad row now rather than an error in
        the middle of training or evaluation.
        """
        if image is None or isinstance(image, Image.Image):
            return image
        if not isinstance(image, str | os.PathLike):
            self.bad(
                row, f"field 'image' must be a file path (a string), got {type(image).__name__} {image!r}"
            )
            return None
        path = Path(image)
        if folder is not None and not path.is_absolute():
            path = folder / path
            root = folder.resolve()
            if root not in path.resolve().parents:
                self.bad(
                    row, f"image {image} resolves outside the image folder {folder}; keep images inside it"
                )
                return None
        if path.is_dir():
            self.bad(row, f"image {path} is a folder, not an image file")
            return None
        if not path.is_file():
            self.bad(row, f"image {path} does not exist")
            return None
        try:
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                img.load()  # verify() checks the container only; decoding finds broken pixel data
        except Exception as err:  # PIL raises many types for a corrupt file
            self.bad(row, f"image {path} is unreadable ({type(err).__name__}: {err})")
            return None
        return path

    def add(self, row: int | str, example: ChatExample) -> None:
        if not example.answer.strip():
            self.bad(row, "the answer is empty")
        elif self.max_chars is not None and len(example.prompt) + len(example.answer) > self.max_chars:
            self.bad(
                row,
                f"the example is {len(example.prompt) + len(example.answer)} characters, "
                f"over max_chars={self.max_chars}",
            )
        else:
            self.report.examples.append(example)


def _open(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path


# --- skipvlm's own JSON lines ---------------------------------------------------------------------------


def load_chat_jsonl(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_bad_row: str = "skip",
    max_chars: int | None = None,
) -> LoadReport:
    """JSON lines of ``{"prompt", "answer", "image"?, "choices"?, "id"?}`` (the format of ``load_jsonl``),
    with bad rows reported and skipped (or fatal) like every other loader."""
    path = _open(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    check = _Checker(str(path), on_bad_row, max_chars)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                check.bad(line_no, f"not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                check.bad(line_no, f"not valid JSON ({err.msg})")
                continue
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("prompt"), str)
                or not row["prompt"].strip()
            ):
                check.bad(line_no, "field 'prompt' is missing or empty")
                continue
            choices = row.get("choices")
            if choices is not None and not (
                isinstance(choices, list) and all(isinstance(c, str) for c in choices)
            ):
                check.bad(line_no, "field 'choices' must be a list of strings")
                continue
            image = row.get("image")
            if image is not None:
                image = check.image(line_no, image, folder)
                if image is None:
                    continue
            answer = row.get("answer") if isinstance(row.get("answer"), str) else ""
            rid = str(row.get("id", f"{path.name}:{line_no}"))
            check.add(line_no, ChatExample(row["prompt"], answer, image, choices, rid))
    return check.report


def load_jsonl(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[ChatExample]:
    """The examples of a JSON-lines file; the first bad row raises :class:`BadRowError` naming file and row.

    Raises:
        FileNotFoundError: the file does not exist.
        BadRowError: a row is malformed.
        ValueError: the file holds no examples.
    """
    examples = load_chat_jsonl(path, image_folder, on_bad_row="fail").examples
    if not examples:
        raise ValueError(f"data file {path} holds no examples")
    return examples


# --- LLaVA conversations --------------------------------------------------------------------------------


def _llava_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON list (row = index) or a JSON-lines file (row = line number)."""
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    with path.open(encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
            yield from enumerate(rows)
            return
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as err:
                    yield line_no, ValueError(f"not valid JSON ({err.msg})")


def load_llava(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_bad_row: str = "skip",
    max_chars: int | None = None,
    image_token: str = "<image>",
) -> LoadReport:
    """LLaVA conversation data (``id``, ``image``, ``conversations`` of ``from`` / ``value``), JSON or JSONL.

    A conversation becomes one example: its last ``gpt`` turn is the answer, everything before it is
    the prompt (earlier turns written as ``USER: ... ASSISTANT: ...``). The ``<image>`` placeholder is
    removed from the text; the collator puts the processor's own placeholder where the image goes.
    Images resolve against ``image_folder`` (default: the file's folder).
    """
    path = _open(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    check = _Checker(str(path), on_bad_row, max_chars)
    for row, item in _llava_rows(path):
        if isinstance(item, Exception):
            check.bad(row, str(item))
            continue
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            check.bad(row, "field 'conversations' is missing or has fewer than two turns")
            continue
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") for t in turns):
            check.bad(row, "every turn needs 'from' and a string 'value'")
            continue
        last_gpt = max((i for i, t in enumerate(turns) if t["from"] in ("gpt", "assistant")), default=None)
        if last_gpt is None or last_gpt == 0:
            check.bad(row, "no 'gpt' turn follows a 'human' turn")
            continue
        parts = []
        for i, turn in enumerate(turns[:last_gpt]):
            text = turn["value"].replace(image_token, "").strip()
            parts.append(
                text
                if i == 0
                else f"{'ASSISTANT' if turn['from'] in ('gpt', 'assistant') else 'USER'}: {text}"
            )
        image = item.get("image")
        if image is not None:
            image = check.image(row, image, folder)
            if image is None:
                continue
        example = ChatExample(
            " ".join(parts), turns[last_gpt]["value"].strip(), image, id=str(item.get("id", row))
        )
        check.add(row, example)
    return check.report


# --- ScienceQA ------------------------------------------------------------------------------------------


def scienceqa_prompt(problem: dict[str, Any], fmt: str = "QCM-A") -> tuple[str, str]:
    """(prompt, target) of a ScienceQA problem in the reference setups' layout.

    ``QCM-A``: context, question and options in; ``The answer is X.`` out. ``QCM-ALE``: the same
    prompt, and the target continues with ``BECAUSE: <lecture> <solution>``.
    """
    if fmt not in SCIENCEQA_FORMATS:
        raise ValueError(f"ScienceQA format must be one of {SCIENCEQA_FORMATS}, got {fmt!r}")
    choices = " ".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    context = (problem.get("hint") or "").strip() or "N/A"
    prompt = (
        f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
        "Answer with the option's letter from the given choices."
    )
    target = f"The answer is {_LETTERS[problem['answer']]}."
    if fmt == "QCM-ALE":
        target += (
            f" BECAUSE: {problem.get('lecture', '').strip()} {problem.get('solution', '').strip()}".rstrip()
        )
    return prompt, target


def load_scienceqa(
    problems: str | os.PathLike,
    splits: str | os.PathLike,
    split: str = "test",
    image_folder: str | os.PathLike | None = None,
    fmt: str = "QCM-A",
    on_bad_row: str = "skip",
    max_chars: int | None = None,
) -> LoadReport:
    """ScienceQA from ``problems.json`` + ``pid_splits.json``; images at ``<folder>/<split>/<pid>/<image>``.

    Each example keeps the scoring categories in ``meta`` (subject, grade, has text context, has
    image) and the letter options in ``choices`` (``A``, ``B`` ...), so accuracy is scored by letter.
    """
    problems_path, splits_path = _open(problems), _open(splits)
    try:
        table = json.loads(problems_path.read_text(encoding="utf-8"))
        pids = json.loads(splits_path.read_text(encoding="utf-8"))[split]
    except json.JSONDecodeError as err:
        raise ValueError(f"ScienceQA file is not valid JSON ({err})") from err
    except (KeyError, TypeError) as err:
        raise ValueError(f"{splits_path} has no split {split!r} (it must map split names to lists)") from err
    if not isinstance(table, dict):
        raise ValueError(f"{problems_path} must hold a JSON object of problems keyed by id")
    if not isinstance(pids, list):
        raise ValueError(
            f"{splits_path}: split {split!r} must be a list of problem ids, got {type(pids).__name__}"
        )
    folder = Path(image_folder) if image_folder is not None else problems_path.parent / "images"
    check = _Checker(str(problems_path), on_bad_row, max_chars)
    for pid in pids:
        problem = table.get(str(pid))
        if problem is None:
            check.bad(pid, "listed in the split but missing from problems.json")
            continue
        missing = [k for k in ("question", "choices", "answer") if k not in problem]
        if missing or not isinstance(problem.get("choices"), list) or not problem["choices"]:
            check.bad(pid, f"field(s) {missing or ['choices']} missing or empty")
            continue
        if len(problem["choices"]) > len(_LETTERS):
            check.bad(pid, f"{len(problem['choices'])} choices; at most {len(_LETTERS)} (A-J) are supported")
            continue
        grade_text = str(problem.get("grade", "grade0")).removeprefix("grade")
        if not grade_text.isdigit() and grade_text != "":
            check.bad(pid, f"grade {problem.get('grade')!r} is not of the form 'grade7'")
            continue
        if not isinstance(problem["answer"], int) or not 0 <= problem["answer"] < len(problem["choices"]):
            check.bad(
                pid, f"answer index {problem['answer']!r} is not one of the {len(problem['choices'])} choices"
            )
            continue
        image = None
        if problem.get("image"):
            image = check.image(pid, Path(split) / str(pid) / str(problem["image"]), folder)
            if image is None:
                continue
        prompt, target = scienceqa_prompt(problem, fmt)
        grade = int(grade_text or 0)
        meta = {
            "subject": problem.get("subject", ""),
            "grade": grade,
            "has_text_context": bool((problem.get("hint") or "").strip()),
            "has_image": image is not None,
            "answer_letter": _LETTERS[problem["answer"]],
        }
        letters = list(_LETTERS[: len(problem["choices"])])
        check.add(pid, ChatExample(prompt, target, image, choices=letters, id=str(pid), meta=meta))
    return check.report


# --- Hugging Face datasets ------------------------------------------------------------------------------


def load_hf_dataset(
    path: str | os.PathLike,
    split: str | None = None,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    choices_column: str | None = None,
    on_bad_row: str = "skip",
    max_chars: int | None = None,
) -> LoadReport:
    """A dataset saved with ``save_to_disk`` (a folder) or parquet file(s) (a file or a folder of them).

    Column names are configurable. Images may be PIL images (the ``Image`` feature), paths, or
    ``{"bytes": ...}`` / ``{"path": ...}`` records.
    """
    import io

    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    parquet = [path] if path.suffix == ".parquet" else sorted(path.glob("**/*.parquet"))
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(str(path))
    elif parquet:
        data = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet])
    else:
        raise ValueError(f"{path} is neither a save_to_disk folder nor parquet file(s)")
    if isinstance(data, datasets.DatasetDict):
        name = split or ("test" if "test" in data else next(iter(data)))
        if name not in data:
            raise ValueError(f"{path} has no split {name!r}; it has {list(data)}")
        data = data[name]
    needed = [c for c in (question_column, answer_column) if c not in data.column_names]
    if needed:
        raise ValueError(
            f"{path} has no column(s) {needed}; its columns are {data.column_names} (see --*-column)"
        )
    check = _Checker(str(path), on_bad_row, max_chars)
    for i, row in enumerate(data):
        question, answer = row.get(question_column), row.get(answer_column)
        if not isinstance(question, str) or not question.strip():
            check.bad(i, f"column {question_column!r} is empty")
            continue
        image = row.get(image_column) if image_column in data.column_names else None
        if isinstance(image, dict):
            if image.get("bytes"):
                try:
                    image = Image.open(io.BytesIO(image["bytes"]))
                    image.load()
                except Exception as err:
                    check.bad(i, f"image bytes are unreadable ({type(err).__name__})")
                    continue
            else:
                image = image.get("path")
        if image is not None:
            image = check.image(i, image)
            if image is None:
                continue
        choices = row.get(choices_column) if choices_column else None
        check.add(
            i, ChatExample(question.strip(), str(answer or "").strip(), image, choices=choices, id=str(i))
        )
    return check.report
