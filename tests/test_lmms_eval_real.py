"""The lmms-eval model against the real lmms-eval: its registry, its request objects, and its command line
end to end on a small local task (synthetic boards), scored like `skipvlm eval` on the same examples.

Runs where lmms-eval is importable (.ci/lmms-eval installs it in its own virtual environment); skipped in
the default suite. Each command-line run takes some seconds (lmms-eval's imports), so there are few.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from skipvlm import toy  # noqa: E402
from skipvlm.data.synthetic import SyntheticTask  # noqa: E402

TASK = "skipvlm_boards"
FAMILIES = ("colorat", "anycolor", "colors", "shapes")
PLAN = "skip_attention=3+5"
BIN = Path(sys.executable).parent
# lmms-eval and datasets must not reach for the network; lmms-eval's own log level stays readable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

_UTILS = """\
from skipvlm.evaluate import normalize_answer


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    # `skipvlm eval`'s exact match, so both report the same accuracy for the same answers
    return {"exact": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A local lmms-eval task over 12 synthetic boards: a ``save_to_disk`` dataset, a YAML and its utils."""
    import datasets

    root = tmp_path_factory.mktemp("lmms")
    examples = SyntheticTask(families=FAMILIES).examples(12, "val", seed=5)
    features = datasets.Features(
        {k: datasets.Value("string") for k in ("id", "question", "answer")} | {"image": datasets.Image()}
    )
    rows = {
        "id": [ex.id for ex in examples],
        "image": [ex.image for ex in examples],
        "question": [ex.prompt for ex in examples],
        "answer": [ex.answer for ex in examples],
    }
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        root / "data"
    )
    (root / "tasks").mkdir()
    (root / "tasks" / "utils.py").write_text(_UTILS)
    (root / "tasks" / "boards.yaml").write_text(
        textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: {root / "data"}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 16
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """)
    )
    return root


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """The shipped toy under the plan, saved with save_pretrained (the plan travels in its config)."""
    import skipvlm

    model, processor = toy.load_toy()
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[3, 5]))
    return toy.save_toy(model, processor, tmp_path_factory.mktemp("planned") / "model")


def lmms_eval_cli(task: Path, out: Path, model_args: str, *extra: str, launcher=()) -> tuple[dict, list, str]:
    """Run lmms-eval's command line; (results, logged samples sorted by doc id, its whole output)."""
    command = [
        *launcher,
        "-m",
        "lmms_eval",
        "--model",
        "skipvlm",
        "--model_args",
        model_args,
        "--tasks",
        TASK,
    ]
    command += ["--include_path", str(task / "tasks"), "--output_path", str(out), "--log_samples", *extra]
    if not launcher:
        command = [sys.executable, *command]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output  # lmms-eval exits 0 even on errors: the results file says more
    results = sorted(out.rglob("*_results.json"))
    assert results, f"lmms-eval wrote no results:\n{output[-4000:]}"
    (samples,) = out.rglob(f"*_samples_{TASK}.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return json.loads(results[-1].read_text())["results"][TASK], rows, output


def answers(rows: list) -> list[str]:
    """The answer of each logged sample (lmms-eval logs the filtered response of a single answer)."""
    return [
        r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0] for r in rows
    ]


def test_lmms_eval_finds_the_model_through_the_entry_point():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from skipvlm.lmms_eval import SkipVLM

    assert get_model("skipvlm") is SkipVLM
    assert MODEL_REGISTRY_V2.get_manifest("skipvlm").simple_class_path == "skipvlm.lmms_eval.SkipVLM"
    assert lmms_eval.api.registry.MODEL_REGISTRY["skipvlm"] is SkipVLM


def test_real_requests_from_the_arg_string_lmms_eval_passes():
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from skipvlm.data.chat import ChatCollator

    examples = SyntheticTask(families=FAMILIES).examples(3, "val", seed=2)
    lm = get_model("skipvlm").create_from_arg_string(
        f"pretrained={toy.SHIPPED},{PLAN},max_new_tokens=6",
        {"batch_size": "auto", "max_batch_size": 2, "device": None},  # what the evaluator adds
    )
    lm.task_dict = {"boards": {"test": [{"image": ex.image, "question": ex.prompt} for ex in examples]}}
    templated = lm.apply_chat_template([{"role": "user", "content": examples[0].prompt}])

    def instance(i: int, context: str, settings: dict) -> Instance:
        args = (context, settings, lambda doc: [doc["image"]], i, "boards", "test")
        return Instance("generate_until", args, i, {"task": "boards", "doc_id": i, "repeats": 1})

    settings = {"until": "Question:", "max_new_tokens": 6}
    requests = [instance(i, templated if i == 0 else ex.prompt, settings) for i, ex in enumerate(examples)]
    got = lm.generate_until(requests)
    collator = ChatCollator(lm.processor)
    batch = collator(examples, train=False)
    ids = lm.model.generate(**batch, max_new_tokens=6, do_sample=False)
    expected = [
        t.strip()
        for t in lm.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    assert got == expected and lm.batch_size == 2 and lm.chat_template == toy.CHAT_TEMPLATE


def test_the_command_line_scores_like_skipvlm_eval(task, planned, tmp_path):
    scores, rows, _ = lmms_eval_cli(task, tmp_path / "saved", f"pretrained={planned}", "--batch_size", "4")
    ev = subprocess.run(
        [str(BIN / "skipvlm"), "eval", "--model", str(planned), "--data", str(task / "data"),
         "--format", "hf", "--max-new-tokens", "16", "--batch-size", "4", "--device", "cpu",
         "--out", str(tmp_path / "ev")],
        capture_output=True, text=True, env=ENV, check=True,
    )  # fmt: skip
    reference = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert scores["exact,none"] == pytest.approx(reference["accuracy"]), ev.stdout
    assert answers(rows) == [p["prediction"] for p in reference["predictions"]]
    assert 0 < reference["accuracy"] < 1  # a score that could differ

    # the plan as model arguments on the shipped toy, with lmms-eval's other batch size and until forms
    again, rows_again, _ = lmms_eval_cli(
        task, tmp_path / "args", f"pretrained={toy.SHIPPED},{PLAN}", "--batch_size", "auto:2",
        "--gen_kwargs", "until=Question:,max_new_tokens=16",
    )  # fmt: skip
    assert again["exact,none"] == scores["exact,none"] and answers(rows_again) == answers(rows)


@pytest.mark.slow
def test_two_processes_score_like_one(task, planned, tmp_path):
    one, rows, _ = lmms_eval_cli(task, tmp_path / "one", f"pretrained={planned}", "--batch_size", "2")
    # on a machine without GPUs accelerate's multi-process launcher runs the processes with gloo on CPU
    launcher = (str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29517")  # fmt: skip
    two, rows_two, output = lmms_eval_cli(
        task, tmp_path / "two", f"pretrained={planned},device=cpu", "--batch_size", "2", launcher=launcher
    )
    assert "Running on rank 1" in output  # two processes shared the documents
    assert two["exact,none"] == one["exact,none"] and answers(rows_two) == answers(rows)


def test_a_folder_that_cannot_be_loaded_is_named_in_the_output(task, tmp_path):
    missing = tmp_path / "no-such-model"
    command = [sys.executable, "-m", "lmms_eval", "--model", "skipvlm",
               "--model_args", f"pretrained={missing}", "--tasks", TASK,
               "--include_path", str(task / "tasks")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0  # lmms-eval's choice: it reports the error and exits 0
    assert f"cannot load the model folder {missing}" in run.stdout + run.stderr


def test_importing_skipvlm_imports_no_lmms_eval():
    check = "import sys, skipvlm; print(any(m.startswith('lmms_eval') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert importlib.util.find_spec("skipvlm.lmms_eval_plugin") is not None
