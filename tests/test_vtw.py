"""VTW calibration picks the first layer under eta, on a model built so that the answer is known."""

from __future__ import annotations

import json

import pytest
import torch

import skipvlm
from skipvlm.arch import get_layers
from skipvlm.data import ChatCollator

from conftest import build_model, colour_examples, make_inputs, toy_parts


def blind_from(layer: int, num_layers: int = 6):
    """A tiny LLaVA whose attentions from ``layer`` on output nothing: from there, text tokens cannot read
    the image, so withdrawing visual tokens at any K >= ``layer`` changes nothing, and earlier K do."""
    model = build_model("llava", num_layers=num_layers)
    with torch.no_grad():
        for decoder_layer in get_layers(model)[layer:]:
            decoder_layer.self_attn.o_proj.weight.zero_()
    return model


def test_calibration_returns_the_first_layer_under_eta(tmp_path):
    model = blind_from(3)
    batches = [make_inputs("llava", lengths=(6, 4), seed=s) for s in range(2)]
    result = skipvlm.calibrate_vtw(
        model, batches, eta=1e-7, min_layer=1, plot=tmp_path / "kl.png", progress=False
    )
    assert result.layer == 3
    assert sorted(result.kl) == [1, 2, 3, 4, 5]
    assert result.kl[1] > 1e-5 and result.kl[2] > 1e-5
    assert max(result.kl[k] for k in (3, 4, 5)) < 1e-9
    assert result.num_examples == 4
    assert (tmp_path / "kl.png").stat().st_size > 1000
    saved = json.loads(result.save(tmp_path / "vtw.json").read_text())
    assert saved["layer"] == 3 and set(saved["kl"]) == {"1", "2", "3", "4", "5"}
    assert skipvlm.current_plan(model).is_empty  # the calibration leaves the model's plan as it was

    assert skipvlm.calibrate_vtw(model, batches, eta=1e-7, min_layer=4, progress=False).layer == 4
    # A threshold nothing reaches keeps every visual token.
    assert skipvlm.calibrate_vtw(blind_from(6), batches, eta=0.0, progress=False).layer == 6


def test_calibration_keeps_the_models_skips_and_reads_chat_examples():
    model, processor = toy_parts(num_layers=4)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
    collator = ChatCollator(processor)
    result = skipvlm.calibrate_vtw(model, colour_examples(5), collator=collator, batch_size=2, progress=False)
    assert result.num_examples == 5 and sorted(result.kl) == [1, 2, 3]
    assert all(v >= 0 for v in result.kl.values())
    assert skipvlm.current_plan(model) == skipvlm.Plan(skip_attention=[2])
    with pytest.raises(ValueError, match="need a collator"):
        skipvlm.calibrate_vtw(model, colour_examples(2), progress=False)


def test_calibration_errors_name_the_problem():
    model = build_model("llava")
    batches = [make_inputs("llava")]
    with pytest.raises(ValueError, match=r"min_layer must lie in 1\.\.3"):
        skipvlm.calibrate_vtw(model, batches, min_layer=4, progress=False)
    with pytest.raises(ValueError, match="no visual tokens"):
        skipvlm.calibrate_vtw(build_model("llama"), [make_inputs("llama")], progress=False)
    text_only = {"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="no calibration example has an image"):
        skipvlm.calibrate_vtw(model, [text_only], progress=False)
