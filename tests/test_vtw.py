"""VTW calibration picks the first layer under eta, on a model built so that the answer is known."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import skipvlm
from skipvlm.arch import arch_facts, get_layers
from skipvlm.data import ChatCollator

from conftest import (
    BOS,
    PAD,
    build_model,
    colour_examples,
    logits,
    make_inputs,
    masked_reference,
    toy_parts,
)


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


def sharp_llava():
    """A tiny LLaVA whose lm_head is scaled up: peaked next-token distributions, so that withdrawing the
    image moves them far and KL(p_K || p_full) and KL(p_full || p_K) differ by several per cent."""
    model = build_model("llava")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def with_text_only_row(inputs):
    """``inputs`` (one prompt with an image) and a text-only prompt, left-padded into one batch."""
    row = inputs["input_ids"][0].tolist()
    text = [BOS, 7, 8, 9, 10]
    width = len(row)
    ids = torch.tensor([row, [PAD] * (width - len(text)) + text])
    mask = (ids != PAD).long()
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"]}


def reference_kl(model, batches, k: int) -> tuple[float, float]:
    """(mean KL(p_K || p_full), mean KL(p_full || p_K)) over the prompts with an image, at the last prompt
    position: p_full from the stock model, p_K from the stock model in which no query attends to the
    visual tokens from layer k on; one example at a time, in float64."""
    image_token = arch_facts(model).image_token_id
    forward = reverse = 0.0
    count = 0
    for batch in batches:
        visual = batch["input_ids"] == image_token
        full = torch.log_softmax(logits(model, batch)[:, -1].double(), -1)
        exited = torch.log_softmax(masked_reference(model, batch, k, visual)[:, -1].double(), -1)
        for b in range(full.shape[0]):
            if not visual[b].any():
                continue
            p_k, p_full = exited[b].exp(), full[b].exp()
            forward += float((p_k * (exited[b] - full[b])).sum())
            reverse += float((p_full * (full[b] - exited[b])).sum())
            count += 1
    return forward / count, reverse / count


def test_calibration_kl_is_the_mean_of_kl_exited_to_full_over_image_prompts():
    model = sharp_llava()
    batches = [make_inputs("llava", lengths=(6, 4), seed=0), with_text_only_row(make_inputs("llava", seed=1))]
    result = skipvlm.calibrate_vtw(model, batches, eta=0.0, progress=False)
    assert result.num_examples == 3  # the text-only prompt is not an example
    assert sorted(result.kl) == [1, 2, 3]
    expected = {k: reference_kl(model, batches, k) for k in (1, 2, 3)}
    for k, (forward, reverse) in expected.items():
        # The test can tell the direction and a sum from a mean: both differ by far more than its tolerance.
        assert abs(forward - reverse) > 0.02 * forward
        assert forward > 0.2
        assert result.kl[k] == pytest.approx(forward, rel=1e-4), k
    # eta between two layers' KL picks the first layer under it.
    assert expected[1][0] > expected[2][0] > expected[3][0]
    for layer in (2, 3):
        eta = (expected[layer - 1][0] + expected[layer][0]) / 2
        assert skipvlm.calibrate_vtw(model, batches, eta=eta, progress=False).layer == layer
    assert skipvlm.calibrate_vtw(model, batches, eta=expected[1][0] * 1.001, progress=False).layer == 1
    assert skipvlm.calibrate_vtw(model, batches, eta=result.kl[2], progress=False).layer == 2  # KL == eta
    assert skipvlm.calibrate_vtw(model, batches, eta=expected[3][0] * 0.999, progress=False).layer == 4


def test_calibration_keeps_the_models_skips_and_reads_chat_examples():
    model, processor = toy_parts(num_layers=4)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
    collator = ChatCollator(processor)
    result = skipvlm.calibrate_vtw(model, colour_examples(5), collator=collator, batch_size=2, progress=False)
    assert result.num_examples == 5 and sorted(result.kl) == [1, 2, 3]
    # The KL of each K, against a reference: the toy model with attention 2 zeroed, the visual tokens
    # masked from K on.
    reference = copy.deepcopy(model)
    skipvlm.apply_plan(reference, skipvlm.Plan())
    with torch.no_grad():
        get_layers(reference)[2].self_attn.o_proj.weight.zero_()
    batches = [collator(colour_examples(5)[s : s + 2], train=False) for s in (0, 2, 4)]
    ref = {k: reference_kl(reference, batches, k)[0] for k in (1, 2, 3)}
    assert min(ref.values()) > 1e-6
    assert result.kl == pytest.approx(ref, rel=1e-3, abs=1e-7)
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
