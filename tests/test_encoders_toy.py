"""The BridgeTower toy, its demo, its MAC counts and the command line (METHODS §5, §7)."""

from __future__ import annotations

import json

import pytest
import torch

import skipvlm
from skipvlm import presets
from skipvlm.cli import main
from skipvlm.data.synthetic import FAMILIES, SyntheticTask
from skipvlm.encoders.cost import count_encoder_macs, das_share, plan_shares, sublayer_macs
from skipvlm.encoders.toy import (
    SHIPPED,
    EncoderCollator,
    EncoderToyConfig,
    answer_vocabulary,
    build_toy_bridgetower,
    evaluate_vqa,
    load_toy_bridgetower,
)


def test_every_answer_of_the_shapes_world_is_in_the_vocabulary():
    answers = set(answer_vocabulary())
    for family in FAMILIES:
        for ex in SyntheticTask(families=(family,)).examples(40, "val"):
            assert ex.answer in answers, (family, ex.answer)


def test_collator_right_pads_and_starts_with_the_pooled_token():
    from skipvlm.data.synthetic import vocabulary
    from skipvlm.toy import build_tokenizer

    tokenizer = build_tokenizer(vocabulary())
    collator = EncoderCollator(tokenizer, 48, answer_vocabulary())
    batch = collator(SyntheticTask(families=("colors", "colorat")).examples(4))
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < batch["input_ids"].shape[1]  # padded, on the right
    for row, n in zip(batch["attention_mask"], lengths, strict=True):
        assert row[:n].all() and not row[n:].any()
    assert batch["pixel_values"].shape == (4, 3, 48, 48) and batch["labels"].dtype == torch.long
    model = build_toy_bridgetower(tokenizer, EncoderToyConfig(co_layers=2, text_layers=1, vision_layers=1))
    assert 0 <= evaluate_vqa(model, collator, SyntheticTask().examples(6)) <= 1


def test_shipped_toy_loads_and_records_its_pretraining():
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no shipped toy BridgeTower")
    model, _ = load_toy_bridgetower()
    record = json.loads((SHIPPED / "pretrain.json").read_text())
    assert {"command", "steps", "seconds", "val_accuracy"} <= set(record)
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size <= 10 * 2**20
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=["text.1.cross"]))
    assert skipvlm.current_plan(model).skip_attention == ("text.1.cross",)


def test_sublayer_macs_follow_the_formulas():
    config = presets.get("bridgetower-base")
    t, n, c, f = 40, 325, 768, 3072
    macs = sublayer_macs(config, t)
    assert macs["text.0.self"] == 4 * c * c * t + 2 * t * t * c
    assert macs["image.3.cross"] == 2 * c * c * n + 2 * c * c * t + 2 * n * t * c
    assert macs["image.5.ffn"] == 2 * c * f * n
    assert sublayer_macs(config, t, paper=True)["text.0.cross"] == 2 * c * c * t + 2 * c * c * n
    base = count_encoder_macs(config, t)
    plan = skipvlm.Plan(skip_attention=["text.0.self", "image.3.cross"])
    assert (
        base.total - count_encoder_macs(config, t, plan).total == macs["text.0.self"] + macs["image.3.cross"]
    )
    shares = plan_shares(config, t, 8)
    assert shares["min"] < shares["mean"] < shares["max"]
    assert das_share(config, t, 2) == pytest.approx(2 * das_share(config, t, 1))


def test_cost_command_prints_the_module_table(capsys, tmp_path):
    out = tmp_path / "cost.json"
    code = main(
        [
            "cost",
            "--preset",
            "bridgetower-base",
            "--skip-sublayers",
            "text.1.cross,image.0.ffn",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "vision_encoder" in text and "co-attention layers" in text and "EAS8" in text
    data = json.loads(out.read_text())
    assert data["plan"]["plan"]["skip_mlp"] == ["image.0.ffn"] and data["removed_share"] > 0
    assert main(["cost", "--preset", "bridgetower-base", "--skip-attention", "1"]) == 2
    assert "--skip-sublayers" in capsys.readouterr().err
    assert main(["cost", "--preset", "llama-cpu", "--skip-sublayers", "text.0.self"]) == 2
    assert "decoder takes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--skip-sublayers", "text.9.cross"], "names co-attention layer 9, but the model has 6"),
        (["--skip-sublayers", "txt.1.self"], "streams are"),
        (["--skip-sublayers", "text.1"], "is not a sublayer name"),
        (["--visual-exit-layer", "2"], "token exit is not available on BridgeTower"),
        (["--fastv-layer", "2"], "token exit is not available on BridgeTower"),
        (["--images", "2"], "drop --images"),
    ],
)
def test_cost_command_refuses_what_bridgetower_cannot_count(capsys, options, message):
    assert main(["cost", "--preset", "bridgetower-base", *options]) == 2
    assert message in capsys.readouterr().err


def test_cost_command_refuses_text_tokens_on_a_decoder(capsys):
    assert main(["cost", "--preset", "llama-cpu", "--text-tokens", "30"]) == 2
    assert "a decoder takes --prompt-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cost", "--preset", "bridgetower-base", "--text-tokens", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="text_tokens must be a positive integer"):
        count_encoder_macs(presets.get("bridgetower-base"), 0)


@pytest.mark.slow
def test_demo_quick_runs_every_method(tmp_path, capsys):
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no shipped toy BridgeTower")
    code = main(
        ["demo", "--host", "bridgetower", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]
    )
    assert code == 0
    result = json.loads((tmp_path / "demo" / "results.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["zero_shot", "full_ft", "adapter", "lora", "das k=1", "eas k=4", "eas k=8"]
    eas = result["rows"][-1]
    assert len(eas["skip_attention"]) == 8 and eas["macs_removed_pct"] > 0


def test_pretraining_writes_a_loadable_toy_and_its_record(tmp_path):
    from skipvlm.encoders.toy import pretrain_bridgetower
    from skipvlm.toy import PRETRAIN_FAMILIES

    config = EncoderToyConfig(
        hidden_size=16, intermediate_size=32, text_layers=2, vision_layers=2, co_layers=2, vision_hidden=64,
        image_size=16, patch_size=8,
    )  # fmt: skip
    info = pretrain_bridgetower(tmp_path / "bt", config, 2, batch_size=2, eval_examples=2, progress=False)
    record = json.loads((tmp_path / "bt" / "pretrain.json").read_text())
    assert record == json.loads(json.dumps(info))
    assert record["steps"] == 2 and record["pretrain_families"] == list(PRETRAIN_FAMILIES)
    assert record["config"]["co_layers"] == 2 and record["seconds"] > 0 and "torch" in record
    model, collator = load_toy_bridgetower(tmp_path / "bt")
    assert model.config.num_hidden_layers == 2 and collator is not None
