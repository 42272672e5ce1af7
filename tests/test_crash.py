"""A real process killed with SIGKILL at every step of a checkpoint save, then resumed with ``--resume``.

The child runs ``skipvlm train --checkpoint-every 2`` and sends itself SIGKILL at one point of its second
save (step 4): no ``finally``, no ``except BaseException``, no cleanup runs, as after a power cut or the
OOM killer. The resumed run must continue from the last complete checkpoint and end with the adapters
of an uninterrupted run, bit for bit. The kill points are found by wrapping the functions the save calls
inside the child (see ``CHILD``); the library has no test hook.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from skipvlm import train_loop as loops
from skipvlm.cli import main

# 16 examples / batch 4 = 4 steps per epoch, 2 epochs: 8 steps, checkpoints after steps 2, 4, 6 and 8.
STEPS = 8

CHILD = r"""
import os, pathlib, signal, sys

from skipvlm import train_loop as T
from skipvlm.cli import main

point, target = sys.argv[1], int(sys.argv[2])
count = {"save": 0, "rename": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def armed():
    return count["save"] == target


save = T.Loop.save


def counted_save(self, extra):
    count["save"] += 1
    save(self, extra)
    if armed() and point == "after_save":
        die()


save_file = T.save_file


def hooked_save_file(tensors, filename, *args, **kwargs):
    if armed() and point == "before_tensors":
        die()
    save_file(tensors, filename, *args, **kwargs)
    if armed() and point == "torn_tensors":  # the tensors half written when the kill comes
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        die()
    if armed() and point == "after_tensors":
        die()


write_text = pathlib.Path.write_text


def hooked_write_text(self, *args, **kwargs):
    out = write_text(self, *args, **kwargs)
    if armed() and point == "after_json" and self.name == "state.json":
        die()
    return out


def hooked(move):
    def moved(src, dst, *args, **kwargs):
        out = move(src, dst, *args, **kwargs)
        if armed() and "train_checkpoint" in os.fspath(dst):
            count["rename"] += 1
            if point == f"after_rename_{count['rename']}":
                die()
        return out

    return moved


T.Loop.save = counted_save
T.save_file = hooked_save_file
pathlib.Path.write_text = hooked_write_text
os.rename, os.replace = hooked(os.rename), hooked(os.replace)  # Path.rename calls os.rename
sys.exit(main(sys.argv[3:]))
"""


def train_args(toy_dir, out) -> list[str]:
    return [
        "train",
        "--model",
        str(toy_dir / "model"),
        "--train",
        str(toy_dir / "train.jsonl"),
        "--batch-size",
        "4",
        "--skip-attention",
        "1,2",
        "--dropout",
        "0.1",  # the random state must resume too
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--checkpoint-every",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def uninterrupted(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(train_args(toy_dir, out)) == 0
    return load_file(str(out / "adapters" / "adapter_model.safetensors"))


SLOW = pytest.mark.slow  # the default suite kills three points; `make test-all` every one

# (kill point, which save, the steps the resumed run may start from)
CASES = [
    pytest.param("before_tensors", 2, {2}, id="staging-folder-empty", marks=SLOW),
    pytest.param("torn_tensors", 2, {2}, id="tensors-half-written"),
    pytest.param("after_tensors", 2, {2}, id="tensors-written-no-state-json", marks=SLOW),
    pytest.param("after_json", 2, {2}, id="staging-complete-before-swap", marks=SLOW),
    # the old checkpoint renamed aside, the new one not yet in place: either is a complete checkpoint
    pytest.param("after_rename_1", 2, {2, 4}, id="between-the-two-renames"),
    pytest.param("after_rename_2", 2, {4}, id="swapped-old-not-yet-removed"),
    pytest.param("after_save", 2, {4}, id="save-complete", marks=SLOW),
    pytest.param("after_json", 1, {0}, id="first-save-never-completed", marks=SLOW),
]


@pytest.mark.parametrize(("point", "save", "starts"), CASES)
def test_sigkill_during_a_checkpoint_save_resumes_to_the_same_adapters(
    toy_dir, tmp_path, uninterrupted, monkeypatch, capsys, point, save, starts
):
    out = tmp_path / "run"
    args = train_args(toy_dir, out)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, point, str(save), *args], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, (
        f"the child was not killed at {point}:\n{child.stderr[-3000:]}"
    )
    assert not (out / "adapters").exists()

    steps = []
    update = loops.Loop.update

    def counted_update(self):
        update(self)
        steps.append(self.step)

    monkeypatch.setattr(loops.Loop, "update", counted_update)
    if starts == {0}:  # no save completed: --resume says so, and a fresh run starts over
        assert main([*args, "--resume"]) == 2
        assert "no checkpoint to resume" in capsys.readouterr().err
        assert main(args) == 0
    else:
        assert main([*args, "--resume"]) == 0
    assert steps[-1] == STEPS
    assert steps[0] - 1 in starts, f"resumed after step {steps[0] - 1}, expected one of {sorted(starts)}"
    resumed = load_file(str(out / "adapters" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
