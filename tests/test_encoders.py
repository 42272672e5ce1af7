"""The BridgeTower host (METHODS §7): plans by sublayer name, parity with the zeroed stock model, PIA,
adapters, save / load, heads, search and training on tiny random models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm.encoders.eas import EncoderEASConfig, EncoderEASModel
from skipvlm.encoders.heads import (
    BridgeTowerForNLVR2,
    BridgeTowerForVQA,
    recall_at_k,
    retrieval_scores,
    vqa_loss,
    vqa_score,
)
from skipvlm.encoders.host import co_layers
from skipvlm.encoders.layers import CoLayer
from skipvlm.encoders.names import EncoderCandidates
from skipvlm.train import eas_config_for_plan

LAYERS = 2
ANSWERS = ["yes", "no", "red", "blue"]
NAMES = ["text.0.self", "text.1.cross", "image.0.self", "image.1.cross"]


def bt_config(**overrides) -> tf.BridgeTowerConfig:
    text = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    vision = dict(hidden_size=64, num_hidden_layers=2, image_size=16, patch_size=8)
    kw = dict(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, id2label=dict(enumerate(ANSWERS))
    )
    kw.update(overrides)
    return tf.BridgeTowerConfig(text_config=text, vision_config=vision, **kw)


def build(cls=tf.BridgeTowerModel, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(bt_config()).eval()


def inputs(batch: int = 3, length: int = 7, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (batch, length), generator=gen)
    ids[:, 0] = 1  # the pooled first token
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):  # right padding, a different length per row
        mask[b, length - 2 * b :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen),
    }


def features(model, batch) -> torch.Tensor:
    out = model(**batch)
    if hasattr(out, "text_features"):
        return torch.cat([out.text_features.flatten(1), out.image_features.flatten(1)], 1)
    return out.logits


def zeroed(model, name: str) -> torch.nn.Module:
    """The stock model with the output projection (weight and bias) of sublayer ``name`` set to zero."""
    ref = copy.deepcopy(model)
    stream, layer, kind = name.split(".")
    stock = co_layers(ref, stream)[int(layer)]
    module = {"self": stock.attention.output, "cross": stock.crossattention.output, "ffn": stock.output}[kind]
    with torch.no_grad():
        module.dense.weight.zero_()
        module.dense.bias.zero_()
    return ref


def perturb(model: EncoderEASModel, seed: int = 3) -> None:
    """Give every adapter tensor random values, so that PIA changes what the model computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapters in model.adapters().values():
            for p in adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# --- plans and parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_plain_skip_equals_zeroed_output_projection(name):
    model, batch = build(), inputs()
    reference = features(zeroed(model, name), batch)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[name]))
    torch.testing.assert_close(features(model, batch), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(features(build(), batch), reference, atol=1e-3)  # the skip does change it


def test_ffn_skip_equals_zeroed_ffn_output():
    model, batch = build(), inputs()
    reference = features(zeroed(model, "image.1.ffn"), batch)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_mlp=["image.1.ffn"]))
    torch.testing.assert_close(features(model, batch), reference, atol=1e-5, rtol=0)


def test_plan_on_a_head_model_and_back_to_stock():
    model = build(tf.BridgeTowerForImageAndTextRetrieval)
    keys = list(model.state_dict())
    batch = inputs()
    stock = features(model, batch)
    plan = skipvlm.Plan(skip_attention=["text.1.cross", "image.0.self"])
    skipvlm.apply_plan(model, plan)
    assert skipvlm.current_plan(model) == plan
    assert isinstance(model.bridgetower.cross_modal_text_layers[1], CoLayer)
    assert list(model.state_dict()) == keys  # state-dict keys never change
    assert model.config.skipvlm_plan == plan.to_dict()
    assert not torch.allclose(features(model, batch), stock)
    skipvlm.apply_plan(model, skipvlm.Plan())
    assert not any(isinstance(m, CoLayer) for m in model.modules())
    assert not hasattr(model.config, "skipvlm_plan")
    torch.testing.assert_close(features(model, batch), stock, atol=0, rtol=0)


HEADS = [tf.BridgeTowerModel, BridgeTowerForVQA, BridgeTowerForNLVR2, tf.BridgeTowerForImageAndTextRetrieval]


@pytest.mark.parametrize("cls", HEADS)
def test_wrapped_layers_with_nothing_skipped_compute_the_stock_model(cls):
    batch = inputs()
    if cls is BridgeTowerForNLVR2:
        batch["pixel_values"] = torch.randn(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    stock = features(build(cls), batch)
    wrapped = build(cls)
    assert len(skipvlm.encoders.HOST.wrap_all(wrapped)) == 2 * LAYERS  # every layer a CoLayer, no skips
    torch.testing.assert_close(features(wrapped, batch), stock, atol=0, rtol=0)
    eas = skipvlm.get_eas_model(build(cls), EncoderEASConfig(replace_dim=8))  # fresh adapt-PIA everywhere
    assert all(a.adapt for a in eas.adapters().values()) and eas.plan.is_empty
    torch.testing.assert_close(features(eas, batch), stock, atol=0, rtol=0)


@pytest.mark.parametrize(
    "plan, message",
    [
        (skipvlm.Plan(skip_attention=[1]), "integer indices are the decoder hosts' form"),
        (skipvlm.Plan(skip_attention=["text.2.self"]), "the model has 2"),
        (skipvlm.Plan(skip_attention=["audio.0.self"]), "streams are"),
        (skipvlm.Plan(skip_attention=["text.0.ffn"]), "FFNs go in skip_mlp"),
        (skipvlm.Plan(skip_attention=["text.0.self"], visual_exit_layer=1), "token exit is not available"),
    ],
)
def test_bad_plans_are_refused_clearly(plan, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        skipvlm.apply_plan(model, plan)
    assert not any(isinstance(m, CoLayer) for m in model.modules())


def test_a_decoder_host_refuses_sublayer_names():
    text = tf.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = tf.LlamaForCausalLM(text)
    with pytest.raises(ValueError, match="decoder host, whose plans take integer layer indices"):
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=["text.0.self"]))


def test_decoder_only_features_refuse_bridgetower():
    with pytest.raises(skipvlm.UnsupportedModelError, match="two-stream encoder host"):
        skipvlm.arch_facts(build())


def test_batched_equals_one_by_one_with_padding():
    model = skipvlm.get_eas_model(
        build(BridgeTowerForVQA), EncoderEASConfig(skip_attention=NAMES, replace_dim=8)
    )
    perturb(model)
    batch = inputs()
    together = model(**batch).logits
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        one = {
            "input_ids": batch["input_ids"][b : b + 1, :n],
            "attention_mask": batch["attention_mask"][b : b + 1, :n],
            "pixel_values": batch["pixel_values"][b : b + 1],
        }
        torch.testing.assert_close(model(**one).logits[0], together[b], atol=1e-5, rtol=0)


def test_a_skipped_sublayer_executes_nothing():
    model = build()
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=["text.1.cross", "image.0.self"]))
    ran = []
    watched = {
        "text.1.cross": co_layers(model, "text")[1].crossattention,
        "image.0.self": co_layers(model, "image")[0].attention,
        "text.1.self": co_layers(model, "text")[1].attention,  # kept: must run
    }
    for name, module in watched.items():
        for proj in (module.self.query, module.self.key, module.self.value, module.output.dense):
            proj.register_forward_hook(lambda *_, name=name: ran.append(name))
    model(**inputs())
    assert ran.count("text.1.self") == 4
    assert "text.1.cross" not in ran and "image.0.self" not in ran


# --- PIA and adapters ------------------------------------------------------------------------------------


def test_fresh_pia_equals_plain_skip():
    batch = inputs()
    plain = build(BridgeTowerForVQA)
    skipvlm.apply_plan(plain, skipvlm.Plan(skip_attention=NAMES, skip_mlp=["text.1.ffn"]))
    eas = skipvlm.get_eas_model(
        build(BridgeTowerForVQA), EncoderEASConfig(skip_attention=NAMES, skip_mlp=["text.1.ffn"])
    )
    assert isinstance(eas, EncoderEASModel)
    assert eas.adapters()["text.0"].replace["self"].rank == 144  # the paper's bottleneck by default
    torch.testing.assert_close(eas(**batch).logits, plain(**batch).logits, atol=1e-5, rtol=0)
    perturb(eas)
    assert not torch.allclose(eas(**batch).logits, plain(**batch).logits, atol=1e-3)


def test_pia_pools_its_own_stream_for_self_and_the_other_for_cross():
    model = skipvlm.get_eas_model(build(), EncoderEASConfig(skip_attention=NAMES, replace_dim=8))
    seen: dict[str, torch.Tensor] = {}
    layer_inputs: dict[str, tuple] = {}
    for layer in (*co_layers(model, "text"), *co_layers(model, "image")):
        key = f"{layer.stream}.{layer.index}"
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, key=key: layer_inputs.__setitem__(key, (args, kwargs)), with_kwargs=True
        )
        for kind, pia in layer.held.replace.items():
            hook = lambda m, a, name=f"{key}.{kind}": seen.__setitem__(name, a[0])  # noqa: E731
            pia.pool.register_forward_pre_hook(hook)  # g = W_A p + b_A reads p
    batch = inputs()
    model(**batch)
    pad = batch["attention_mask"].bool()

    def mean(x, mask):
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    text_in, image_in = layer_inputs["text.0"][0][0], layer_inputs["image.0"][0][0]
    everything = torch.ones(image_in.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(seen["text.0.self"], mean(text_in, pad))  # own stream, padding excluded
    torch.testing.assert_close(seen["image.0.self"], mean(image_in, everything))
    text_in, image_in = layer_inputs["text.1"][0][0], layer_inputs["image.1"][0][0]
    torch.testing.assert_close(seen["text.1.cross"], mean(image_in, everything))  # the other stream
    torch.testing.assert_close(seen["image.1.cross"], mean(text_in, pad))


def test_fresh_das_layer_is_the_identity():
    model = skipvlm.get_eas_model(build(), EncoderEASConfig(skip_layers=[1], replace_dim=8))
    assert model.plan == skipvlm.Plan(
        skip_attention=["text.1.self", "text.1.cross", "image.1.self", "image.1.cross"],
        skip_mlp=["text.1.ffn", "image.1.ffn"],
    )
    layer = co_layers(model, "text")[1]
    h, e = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    torch.testing.assert_close(layer(h, e)[0], h)
    assert model.eas_config.skip_layers == [1]


def test_save_load_round_trip(tmp_path):
    config = EncoderEASConfig(skip_attention=["text.1.cross", "image.0.self"], replace_dim=8)
    model = skipvlm.get_eas_model(build(BridgeTowerForVQA), config)
    perturb(model)
    batch = inputs()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapters")
    assert {p.name for p in (tmp_path / "adapters").iterdir()} == {
        "eas_config.json",
        "adapter_model.safetensors",
    }
    loaded = EncoderEASModel.from_pretrained(build(BridgeTowerForVQA), tmp_path / "adapters")
    assert loaded.plan == model.plan
    torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="saved for a different base model"):
        EncoderEASModel.from_pretrained(build(tf.BridgeTowerModel), tmp_path / "adapters")
    via_decoder_entry = skipvlm.EASModel.from_pretrained(build(BridgeTowerForVQA), tmp_path / "adapters")
    assert isinstance(via_decoder_entry, EncoderEASModel)  # the one entry dispatches on the host
    torch.testing.assert_close(via_decoder_entry(**batch).logits, expected, atol=0, rtol=0)


def test_adapters_of_another_host_are_refused_clearly(tmp_path):
    text = tf.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    decoder = skipvlm.get_eas_model(tf.LlamaForCausalLM(text), skipvlm.EASConfig(skip_attention=[1]))
    decoder.save_pretrained(tmp_path / "decoder")
    encoder = skipvlm.get_eas_model(build(), EncoderEASConfig(skip_attention=["text.0.self"], replace_dim=8))
    encoder.save_pretrained(tmp_path / "encoder")
    base = build()
    with pytest.raises(ValueError, match="model_type: saved for 'llama', this model has 'bridgetower'"):
        EncoderEASModel.from_pretrained(base, tmp_path / "decoder")
    assert not any(isinstance(m, CoLayer) for m in base.modules())  # left unchanged
    with pytest.raises(ValueError, match="model_type: saved for 'bridgetower', this model has 'llama'"):
        skipvlm.EASModel.from_pretrained(tf.LlamaForCausalLM(text), tmp_path / "encoder")


def test_merge_is_refused_clearly(tmp_path):
    model = skipvlm.get_eas_model(build(), EncoderEASConfig(skip_attention=["text.0.self"], replace_dim=8))
    with pytest.raises(ValueError, match="post-norm"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="post-norm"):
        skipvlm.merge_and_unload(model)
    with pytest.raises(ValueError, match="post-norm"):
        skipvlm.export_merged(model, tmp_path / "merged")
    with pytest.raises(ValueError, match="post-norm"):
        model.calibrate([])
    plain = build()  # a planned model without adapters: refused alike, not an AttributeError
    skipvlm.apply_plan(plain, skipvlm.Plan(skip_attention=["text.0.self"]))
    with pytest.raises(ValueError, match="post-norm"):
        skipvlm.merge_and_unload(plain)
    with pytest.raises(ValueError, match="post-norm"):
        skipvlm.export_merged(plain, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_fixed_plan_cannot_move_a_skip_without_its_adapter():
    model = skipvlm.get_eas_model(build(), EncoderEASConfig(skip_attention=["text.0.self"], replace_dim=8))
    with pytest.raises(ValueError, match=r"text\.0\.cross has no replace-PIA"):
        model.set_plan(skipvlm.Plan(skip_attention=["text.0.cross"]))
    assert model.plan == skipvlm.Plan(skip_attention=["text.0.self"])


def test_encoder_config_refuses_indices():
    with pytest.raises(ValueError, match="takes sublayer names"):
        EncoderEASConfig(skip_attention=[1])
    with pytest.raises(TypeError, match="EncoderEASConfig"):
        skipvlm.get_eas_model(build(), skipvlm.EASConfig(skip_attention=[1]))


# --- candidates, heads, search and training ----------------------------------------------------------------


def test_an_empty_plan_with_an_encoder_template_gives_an_encoder_config():
    fixed = eas_config_for_plan(skipvlm.Plan(), "attention", EncoderEASConfig(replace_dim=8))
    assert isinstance(fixed, EncoderEASConfig) and fixed.replace_dim == 8 and fixed.plan().is_empty


def test_candidates_map_arms_to_named_plans():
    eas = EncoderCandidates("attention", 2)
    assert eas.num_arms == 8
    assert eas.plan([0, 7]) == skipvlm.Plan(skip_attention=["text.0.self", "image.1.cross"])
    assert eas.arms(eas.plan([2, 5])) == [2, 5]
    das = EncoderCandidates("layer", 2)
    assert das.num_arms == 2 and das.arms(das.plan([1])) == [1]
    assert len(das.plan([1]).skip_attention) == 4 and len(das.plan([1]).skip_mlp) == 2


def test_heads_losses_and_metrics():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    assert vqa_score(logits, torch.tensor([0, 1])) == 0.5
    soft = torch.tensor([[0.3, 1.0, 0.0, 0.0], [0.0, 0.0, 0.6, 0.0]])
    assert vqa_score(logits, soft) == pytest.approx(0.45)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft) * 4
    torch.testing.assert_close(vqa_loss(logits, soft), expected)
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.5, 1.0]])
    recall = recall_at_k(scores, ks=(1, 2))
    assert recall["text_to_image_r@1"] == pytest.approx(2 / 3) and recall["image_to_text_r@2"] == 1.0

    nlvr = build(BridgeTowerForNLVR2)
    batch = inputs(batch=2)
    batch["pixel_values"] = torch.randn(2, 2, 3, 16, 16)
    out = nlvr(**batch, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and out.loss.item() > 0
    widths = [tuple(m.weight.shape) for m in nlvr.classifier if isinstance(m, torch.nn.Linear)]
    assert widths == [(64, 128), (2, 64)]  # METER's NLVR2 head: 4C -> 2C -> 2
    vqa = build(BridgeTowerForVQA)
    widths = [tuple(m.weight.shape) for m in vqa.classifier if isinstance(m, torch.nn.Linear)]
    assert widths == [(64, 64), (len(ANSWERS), 64)]  # METER's VQA head: 2C -> 2C -> answers
    itm = build(tf.BridgeTowerForImageAndTextRetrieval)
    b = inputs(batch=3)
    assert retrieval_scores(itm, b["input_ids"], b["attention_mask"], b["pixel_values"], 4).shape == (3, 3)


def _vqa_batches(n: int, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        batch = inputs(batch=4, seed=seed + i)
        batch["labels"] = batch["input_ids"][:, 1] % len(ANSWERS)  # an answer readable from the text
        out.append(batch)
    return out


def test_search_and_train_reuse_the_bandit_and_the_loop(tmp_path):
    config = skipvlm.SearchConfig(
        k=2,
        warmup_epochs=1,
        search_epochs=1,
        interval=1,
        n_candidates=2,
        train=skipvlm.TrainConfig(lr=1e-2, progress=False),
    )
    result = skipvlm.search(
        build(BridgeTowerForVQA),
        _vqa_batches(3),
        _vqa_batches(1, seed=50),
        config,
        eas=EncoderEASConfig(replace_dim=8),
        out=tmp_path / "search",
    )
    assert len(result.plan.skip_attention) == 2 and all(
        isinstance(n, str) for n in result.plan.skip_attention
    )
    assert len(result.trajectory) == 4  # the start and one update per search step
    assert (tmp_path / "search" / "plan.json").is_file()
    fixed = result.eas_config(EncoderEASConfig(replace_dim=8))
    assert fixed.skip_attention == list(result.plan.skip_attention) and not fixed.supernet
    model = skipvlm.train(
        build(BridgeTowerForVQA),
        _vqa_batches(3),
        skipvlm.TrainConfig(epochs=2, lr=1e-2, progress=False),
        eas=fixed,
        out=tmp_path / "train",
    )
    assert model.plan == result.plan.replace(candidates=None)
    head = model.base_model.classifier[0].weight
    assert head.requires_grad  # the new answer classifier trains with the adapters
    loaded = EncoderEASModel.from_pretrained(build(BridgeTowerForVQA), tmp_path / "train" / "adapters")
    batch = _vqa_batches(1)[0]
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_das_search_finds_whole_layers():
    config = skipvlm.SearchConfig(
        k=1,
        candidates="layer",
        warmup_epochs=1,
        search_epochs=1,
        interval=1,
        n_candidates=2,
        train=skipvlm.TrainConfig(lr=1e-2, progress=False),
    )
    result = skipvlm.search(
        build(BridgeTowerForVQA),
        _vqa_batches(2),
        _vqa_batches(1, 9),
        config,
        eas=EncoderEASConfig(replace_dim=8),
    )
    fixed = result.eas_config(EncoderEASConfig(replace_dim=8))
    assert len(fixed.skip_layers) == 1 and fixed.skip_attention == []
