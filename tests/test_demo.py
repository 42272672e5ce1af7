"""`skipvlm demo --quick` end to end on the shipped toy checkpoint: every method measured, in results.json."""

from __future__ import annotations

import json

import pytest

from skipvlm import toy
from skipvlm.cli import main
from skipvlm.demo import METHODS

ROW_KEYS = {
    "method", "k", "skip_attention", "skip_mlp", "skip_layers", "trainable_params", "trainable_pct", "macs_g",
    "accuracy", "prefill_ms", "decode_ms_per_token", "merged",
}  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_reports_every_method(demo_run, capsys):
    out, result = demo_run
    rows = result["rows"]
    assert [r["method"] for r in rows] == [
        "zero_shot", "full_ft", "lora", "pia", "eas", "eas", "eas_random", "eas_last_k", "mlp_skip", "das",
        "eas_vtw",
    ]  # fmt: skip
    assert set(METHODS) == {r["method"] for r in rows}
    tests = result["meta"]["config"]["test_examples"]
    for r in rows:
        assert r.keys() >= ROW_KEYS, r["name"]
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] >= 0
        right = r["accuracy"] * tests  # a count of right answers out of the test questions
        assert abs(right - round(right)) < 1e-9, r["name"]
    assert (
        result["meta"]["quick"] is True and result["meta"]["device"] == "cpu" and result["meta"]["seed"] == 0
    )
    assert (out / "accuracy_vs_decode.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "preferences.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_demo_rows_are_consistent(demo_run):
    rows = {r["name"]: r for r in demo_run[1]["rows"]}
    zero, full, pia = rows["zero_shot"], rows["full_ft"], rows["pia"]
    # Every method adapts to the families the toy never saw: each beats zero-shot by > 5 points (the
    # quick run measured 16.7 % zero-shot, 25-42 % adapted).
    for name, row in rows.items():
        if name != "zero_shot":
            assert row["accuracy"] > zero["accuracy"] + 0.05, name
    assert zero["trainable_params"] == 0 and zero["macs_g"] == pia["macs_g"] == full["macs_g"]
    assert (
        rows["lora"]["trainable_params"] < full["trainable_params"]
        and pia["trainable_params"] < full["trainable_params"]
    )
    for name in ("eas k=2", "eas_random k=2", "eas_last_k k=2"):
        assert (
            len(rows[name]["skip_attention"]) == 2
            and rows[name]["merged"]
            and rows[name]["macs_g"] < pia["macs_g"]
        )
    assert (
        len(rows["eas k=3"]["skip_attention"]) == 3 and rows["eas k=3"]["macs_g"] < rows["eas k=2"]["macs_g"]
    )
    assert rows["eas_last_k k=2"]["skip_attention"] == [6, 7]
    assert len(rows["mlp_skip k=2"]["skip_mlp"]) == 2 and not rows["mlp_skip k=2"]["skip_attention"]
    das = rows["das k=1"]
    assert len(das["skip_layers"]) == 1 and not das["merged"] and das["macs_g"] < pia["macs_g"]
    assert rows["eas k=2"]["kv_cache_bytes"] < pia["kv_cache_bytes"]
    vtw, eas = rows["eas_vtw k=2"], rows["eas k=2"]
    exit_layer = vtw["visual_exit_layer"]
    assert vtw["skip_attention"] == eas["skip_attention"] and 1 <= exit_layer <= 8
    assert {str(k) for k in vtw["vtw_kl"]} == {str(k) for k in range(1, 8)}
    if exit_layer < 8:  # visual tokens left: less work and a smaller cache than the same EAS model
        assert vtw["macs_g"] < eas["macs_g"] and vtw["kv_cache_bytes"] < eas["kv_cache_bytes"]


def test_the_shipped_toy_model_answers_its_pretraining_families():
    info = json.loads((toy.SHIPPED / "pretrain.json").read_text())
    from skipvlm.data import ChatCollator
    from skipvlm.data.synthetic import SyntheticTask
    from skipvlm.evaluate import evaluate

    model, processor = toy.load_toy()
    # chance: guessing the most frequent answer (colour / shape sets, one of 4 colours, yes-no)
    chance = {"colors": 0.15, "shapes": 0.3, "colorat": 0.25, "anycolor": 0.5}
    for family in toy.PRETRAIN_FAMILIES:
        examples = SyntheticTask(families=(family,)).examples(60, "test", 1)
        acc = evaluate(model, ChatCollator(processor), examples, 30, 4, progress=False).accuracy
        assert acc > chance[family] + 0.1, (family, acc)
    assert info["seed"] == 0 and info["steps"] > 0
    weights = toy.SHIPPED / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20


def test_quick_demo_zero_shot_accuracy_matches_a_hand_evaluation(demo_run):
    """The zero-shot row, recounted outside the library's evaluate(): greedy answers of the shipped toy on
    the demo's test questions, compared without case, punctuation or articles."""
    import torch

    from skipvlm.data import ChatCollator
    from skipvlm.data.synthetic import SyntheticTask

    result = demo_run[1]
    meta = result["meta"]["config"]
    model, processor = toy.load_toy()
    task = SyntheticTask(families=toy.DOWNSTREAM_FAMILIES, image_size=model.config.vision_config.image_size)
    test = task.examples(meta["test_examples"], "test", meta["seed"])
    collator = ChatCollator(processor)

    def norm(text: str) -> list[str]:
        words = "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()
        return [w for w in words if w not in ("a", "an", "the")]

    right, bs = 0, meta["batch_size"]
    for start in range(0, len(test), bs):
        chunk = test[start : start + bs]
        batch = collator(chunk, train=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
        for ex, row in zip(chunk, ids[:, batch["input_ids"].shape[1] :], strict=True):
            answer = processor.tokenizer.decode(row, skip_special_tokens=True)
            right += norm(answer) == norm(ex.answer)
    zero = next(r for r in result["rows"] if r["method"] == "zero_shot")
    assert zero["accuracy"] == right / len(test)
