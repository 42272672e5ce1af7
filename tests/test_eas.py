"""The EAS model: identity at init, prompt-only pooling, trainable set, save / load, moving skips."""

from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import skipvlm
import skipvlm.cost
import skipvlm.pia
from skipvlm.arch import arch_facts, get_decoder, get_layers
from skipvlm.data.labels import IGNORE_INDEX
from skipvlm.eas import ADAPTER_FILE, CONFIG_FILE
from skipvlm.search import Candidates

from conftest import build_eas, build_model, greedy, logits, make_inputs, randomize_adapters, select_rows

EAS_ARCHS = ("llama", "llava", "qwen2", "qwen3_vl")
EAS_ARCHS += ("gemma3_text", "gemma3")  # sandwich norms, gain 1 + weight


def with_labels(batch: dict, answer_len: int = 2) -> dict:
    """Supervise the last ``answer_len`` tokens of every row (the prompt is everything before)."""
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, -answer_len:] = batch["input_ids"][:, -answer_len:]
    return {**batch, "labels": labels}


# --- identity at initialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_fresh_model_without_skips_equals_base(arch):
    base = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(base, inputs)
    model = skipvlm.get_eas_model(base, skipvlm.EASConfig())
    assert len(model.adapters.adapt) == 4 and len(model.adapters.replace) == 0
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_fresh_model_with_skips_equals_plain_skip_plus_identity_adapter(arch):
    """An identity replace-PIA feeds gamma_post * N_in(h) to the MLP (METHODS §2): the plain skip with
    gamma_post * gamma_in as the pre-MLP norm's gain. With gamma_in = 1 it is the plain skip."""
    base = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    reference = copy.deepcopy(base)
    with torch.no_grad():
        parts = arch_facts(reference).parts  # gain = weight (Llama) or 1 + weight (Gemma 3)
        for i in (1, 2):
            layer = get_layers(reference)[i]
            post, pre = layer.get_submodule(parts.pre_mlp_norm), layer.get_submodule(parts.input_norm)
            post.weight.copy_(parts.gain(post) * parts.gain(pre) - parts.gain_offset)
    skipvlm.apply_plan(reference, skipvlm.Plan(skip_attention=[1, 2]))
    model = skipvlm.get_eas_model(copy.deepcopy(base), skipvlm.EASConfig(skip_attention=[1, 2]))
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=1e-6)

    with torch.no_grad():
        for m in (base, model):
            for i in (1, 2):
                parts.unit_gain_(get_layers(m)[i].get_submodule(parts.input_norm))
    plain = skipvlm.apply_plan(base, skipvlm.Plan(skip_attention=[1, 2]))
    torch.testing.assert_close(logits(model, inputs), logits(plain, inputs), rtol=0, atol=1e-6)


# --- what runs, what trains -------------------------------------------------------------------------


def test_skipped_attention_still_runs_nothing():
    model = randomize_adapters(build_eas("llama", skip=(0, 2)))
    calls = []
    for i, layer in enumerate(get_layers(model.base_model)):
        layer.self_attn.q_proj.register_forward_hook(lambda *a, i=i: calls.append(i))
    out = model.generate(**make_inputs("llama", lengths=(5,)), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 6 + 3
    assert set(calls) == {1, 3}


def test_only_adapters_require_grad_and_get_gradients():
    model = randomize_adapters(build_eas("llava"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".routes." in n and ".adapters." in n for n in trainable)
    model.train()
    loss = model(**with_labels(make_inputs("llava", lengths=(6, 4)))).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert model.adapters.replace["1"].token.weight.grad.abs().sum() > 0


def test_projector_trains_when_asked():
    model = build_eas("llava", train_projector=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable)
    assert all(".routes." in n or "multi_modal_projector" in n for n in trainable)
    with pytest.raises(ValueError, match="no multimodal projector"):
        build_eas("llama", train_projector=True)


def test_print_trainable_parameters(capsys):
    model = build_eas("llama")
    trainable, total = model.trainable_parameters()
    assert trainable == sum(p.numel() for p in model.adapters.parameters())
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().out


def test_labels_give_the_same_loss_as_the_base_for_a_fresh_model():
    base = build_model("llama")
    batch = with_labels(make_inputs("llama", lengths=(6, 4)))
    with torch.no_grad():
        expected = base(**batch).loss
        got = skipvlm.get_eas_model(base, skipvlm.EASConfig())(**batch).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- pooling over the prompt only ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_answer_tokens_do_not_leak_into_the_pooled_vector(arch):
    """Causal attention keeps prompt positions blind to the answer: only a leak through p changes them."""
    model = randomize_adapters(build_eas(arch))
    batch = with_labels(make_inputs(arch, lengths=(7, 5)), answer_len=3)
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, -3:] = (changed["input_ids"][:, -3:] + 7) % 90 + 3
    before, after = logits(model, batch), logits(model, changed)
    torch.testing.assert_close(after[:, :-3], before[:, :-3], rtol=0, atol=0)
    # without labels the answer is part of the pooled prompt, so the same change does show up
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    changed_no_labels = {k: v for k, v in changed.items() if k != "labels"}
    assert (logits(model, changed_no_labels)[:, :-3] - logits(model, no_labels)[:, :-3]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_padding_never_counts_batch_equals_one_by_one(arch):
    model = randomize_adapters(build_eas(arch))
    batch = make_inputs(arch, lengths=(7, 3))
    padded = logits(model, batch)
    for b in range(2):
        keep = batch["attention_mask"][b].bool()
        alone = logits(model, select_rows(arch, batch, b))
        torch.testing.assert_close(padded[b, keep], alone[0], rtol=0, atol=1e-5)
    changed = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77)}
    torch.testing.assert_close(logits(model, changed)[1, -4:], padded[1, -4:], rtol=0, atol=1e-6)


def test_router_state_is_frozen_at_prefill_while_decoding():
    """Greedy cached decoding equals recomputing each step with the pooling mask fixed to the prompt."""
    model = randomize_adapters(build_eas("llama"))
    prompt = make_inputs("llama", lengths=(6,))
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    n = prompt["input_ids"].shape[1]
    ids = prompt["input_ids"]
    for _ in range(5):
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, :n] = True
        step = logits(model, {"input_ids": ids}, prompt_mask=mask, use_cache=False)
        ids = torch.cat([ids, step[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ids, out)


# --- persistence ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_save_and_load_round_trip_exactly(arch, tmp_path):
    model = randomize_adapters(build_eas(arch))
    inputs = make_inputs(arch, lengths=(6, 3))
    model.calibrate([inputs], progress=False)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_FILE, CONFIG_FILE])
    state = load_file(tmp_path / ADAPTER_FILE)
    assert state and all(re.match(r"routes\.\d+\.adapters\.(replace|adapt)\.", k) for k in state)
    assert sum(v.numel() for k, v in state.items() if "calib" not in k) == model.trainable_parameters()[0]

    loaded = skipvlm.EASModel.from_pretrained(build_model(arch), tmp_path)
    assert loaded.eas_config == model.eas_config
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    for k, v in loaded.adapter_state_dict().items():
        assert torch.equal(v, state[k]), k


def test_saved_projector_round_trips(tmp_path):
    model = build_eas("llava", train_projector=True)
    with torch.no_grad():
        model.projector().linear_1.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    assert any(k.startswith("projector.") for k in load_file(tmp_path / ADAPTER_FILE))
    loaded = skipvlm.EASModel.from_pretrained(build_model("llava"), tmp_path)
    assert torch.equal(loaded.projector().linear_1.weight, model.projector().linear_1.weight)


def test_loading_onto_another_base_names_the_mismatch(tmp_path):
    build_eas("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_layers: saved for 4, this model has 3"):
        skipvlm.EASModel.from_pretrained(build_model("llama", num_layers=3), tmp_path)
    with pytest.raises(ValueError, match=r"model_type: saved for 'llama', this model has 'qwen2'"):
        skipvlm.EASModel.from_pretrained(build_model("qwen2"), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path / "nope")


def test_loading_a_damaged_or_foreign_adapter_file_fails_clearly(tmp_path):
    build_eas("llama").save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["eas_config"]["replace_dim"] = 16
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has shape"):
        skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path)
    meta["eas_config"]["replace_dim"], meta["eas_config"]["skip_attention"] = 32, [1]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unexpected"):
        skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path)


# --- config and moving skips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapt_layers": "all"}, "adapt_layers must be 'kept' or 'none'"),
        ({"replace_dim": 0}, "replace_dim must be a positive integer"),
        ({"adapt_dim": 5}, "adapt_dim=5 must be a multiple of groups=2"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"skip_attention": [1, 1]}, "more than once"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skipvlm.EASConfig(**kwargs)


def test_config_rejects_layers_the_model_lacks():
    with pytest.raises(ValueError, match=r"allowed indices are 0\.\.3"):
        build_eas("llama", skip=(4,))


def test_supernet_moves_its_skips():
    model = randomize_adapters(build_eas("llama", skip=(1, 2), supernet=True))
    assert len(model.adapters.replace) == len(model.adapters.adapt) == 4
    inputs = make_inputs("llama", lengths=(6, 3))
    before = logits(model, inputs)
    model.set_skip_attention([0, 3])
    assert get_decoder(model.base_model).plan.skip_attention == (0, 3)
    assert model.skip_attention == model.eas_config.skip_attention == [0, 3]
    assert (logits(model, inputs) - before).abs().max() > 1e-3
    model.set_skip_attention([1, 2])
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)


def test_fixed_model_refuses_to_move_a_skip_without_adapters():
    model = build_eas("llama", skip=(1,))
    with pytest.raises(ValueError, match=r"layer\(s\) \[1, 3\] have no adapter.*supernet=True"):
        model.set_skip_attention([3])
    model_none = build_eas("llama", skip=(1,), adapt_layers="none")
    assert len(model_none.adapters.adapt) == 0
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\]"):
        model_none.set_skip_attention([2])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_with_adapters_gives_the_same_gradients():
    batch = with_labels(make_inputs("llama", lengths=(6, 4)))
    grads = []
    for checkpointing in (False, True):
        model = randomize_adapters(build_eas("llama"))
        model.train()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6)


# --- the other candidate kinds --------------------------------------------------------------------------


def test_das_layer_adapter_starts_as_a_plain_layer_skip_and_refuses_to_merge():
    base = build_model("llama")
    inputs = make_inputs("llama", lengths=(6, 3))
    plain = skipvlm.apply_plan(copy.deepcopy(base), skipvlm.Plan(skip_attention=[2], skip_mlp=[2]))
    model = skipvlm.get_eas_model(base, skipvlm.EASConfig(skip_layers=[2]))
    assert list(model.adapters.bottleneck) == ["2"] and "2" not in model.adapters.adapt
    torch.testing.assert_close(logits(model, inputs), logits(plain, inputs), rtol=0, atol=0)
    randomize_adapters(model)
    assert (logits(model, inputs) - logits(plain, inputs)).abs().max() > 1e-3
    model.calibrate([inputs], progress=False)
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\] are skipped whole with DAS.*ReLU"):
        model.merge_and_unload("static")


def test_mlp_skips_run_plainly_and_merge():
    base = build_model("llama")
    inputs = make_inputs("llama", lengths=(6, 3))
    model = randomize_adapters(skipvlm.get_eas_model(base, skipvlm.EASConfig(skip_mlp=[1, 3])))
    assert model.plan == skipvlm.Plan(skip_mlp=[1, 3]) and len(model.adapters.replace) == 0
    model.calibrate([inputs], progress=False)
    model.adapters.use_calibration = True
    forced = logits(model, inputs)
    merged = model.merge_and_unload("static")
    torch.testing.assert_close(logits(merged, inputs), forced, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "replace", "bottleneck"), [("attention_or_mlp", 4, 0), ("mlp", 0, 0), ("layer", 0, 4)]
)
def test_supernets_of_every_candidate_kind_move_their_skips(kind, replace, bottleneck):
    model = skipvlm.get_eas_model(build_model("llama"), skipvlm.EASConfig(supernet=True, candidates=kind))
    adapters = model.adapters
    assert (len(adapters.replace), len(adapters.adapt), len(adapters.bottleneck)) == (replace, 4, bottleneck)
    plan = Candidates(kind, 4).plan([0, 3] if kind != "attention_or_mlp" else [0, 7])
    model.set_plan(plan)
    assert model.plan == plan
    if kind == "layer":
        assert model.eas_config.skip_layers == [0, 3] and model.eas_config.skip_attention == []
    randomize_adapters(model)
    ran = {"attention": set(), "mlp": set()}
    for i, layer in enumerate(get_layers(model.base_model)):
        layer.self_attn.q_proj.register_forward_hook(lambda *a, i=i: ran["attention"].add(i))
        layer.mlp.down_proj.register_forward_hook(lambda *a, i=i: ran["mlp"].add(i))
    out = logits(model, make_inputs("llama", lengths=(5,)))
    assert torch.isfinite(out).all()
    # the moved skips are the ones that no longer run
    assert ran["attention"] == set(range(4)) - set(plan.skip_attention)
    assert ran["mlp"] == set(range(4)) - set(plan.skip_mlp)
    assert plan.skip_attention or plan.skip_mlp


def test_config_rejects_a_layer_listed_twice_across_kinds():
    with pytest.raises(ValueError, match=r"skip_layers \[2\] also appear"):
        skipvlm.EASConfig(skip_attention=[2], skip_layers=[2])
    with pytest.raises(ValueError, match="candidates must be one of"):
        skipvlm.EASConfig(candidates="heads")


DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_adapters_saved_in_format_1_still_load_exactly(tmp_path):
    # Written by the code before the routes redesign (tests/data/make_eas_v1.py, commit 39bb2dc).
    model = skipvlm.EASModel.from_pretrained(build_model("llama"), DATA / "eas_v1")
    assert model.plan == skipvlm.Plan(skip_attention=[1, 3])
    assert model.eas_config.supernet and model.eas_config.init_seed == 3
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    expected = load_file(DATA / "eas_v1" / "expected_logits.safetensors")["logits"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert int(model.adapters.replace["1"].calib_n) == 1
    model.save_pretrained(tmp_path)  # re-saved in today's format, which loads to the same model
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["format_version"] == 2
    again = skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_apply_plan_and_set_plan_are_one_path():
    model = build_eas("llama", skip=(1,))
    for setter in (model.set_plan, lambda plan: skipvlm.apply_plan(model, plan)):
        with pytest.raises(ValueError, match=r"layer\(s\) \[2\] have no adapter"):
            setter(skipvlm.Plan(skip_attention=[1, 2]))
        assert model.plan == skipvlm.Plan(skip_attention=[1])  # a refused plan changes nothing
    supernet = build_eas("llama", skip=(1,), supernet=True)
    skipvlm.apply_plan(supernet, skipvlm.Plan(skip_attention=[0, 2]))
    assert supernet.eas_config.skip_attention == [0, 2] == list(supernet.plan.skip_attention)
    skipvlm.apply_plan(supernet.base_model, skipvlm.Plan(skip_attention=[3]))  # the base model too
    assert supernet.eas_config.skip_attention == [3]
    assert skipvlm.current_plan(supernet) == skipvlm.Plan(skip_attention=[3])
    with skipvlm.use_plan(supernet, skipvlm.Plan()):
        assert supernet.eas_config.skip_attention == []
    assert supernet.eas_config.skip_attention == [3]


def test_the_optimiser_sees_every_trainable_parameter_once_projector_first_then_adapters_by_kind():
    model = build_eas("llava", skip=(1,), supernet=True, train_projector=True)
    params = model.optimizer_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(trainable) == len({id(p) for p in params})
    kinds = [model.adapters.replace, model.adapters.adapt]
    expected = [p for p in model.projector().parameters()]
    expected += [p for kind in kinds for i in sorted(kind, key=int) for p in kind[i].parameters()]
    assert [id(p) for p in params] == [id(p) for p in expected]


def test_a_narrowed_plan_saves_and_reloads_with_every_adapter_built(tmp_path):
    model = randomize_adapters(build_eas("llama", skip=(1, 2), adapt_layers="none"))
    model.set_plan(skipvlm.Plan(skip_attention=[1]))
    model.save_pretrained(tmp_path)
    loaded = skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path)
    assert loaded.plan == skipvlm.Plan(skip_attention=[1]) and loaded.eas_config.skip_attention == [1]
    inputs = make_inputs("llama", lengths=(6, 3))
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    loaded.set_plan(skipvlm.Plan(skip_attention=[1, 2]))  # layer 2's adapter came back too


def test_format_1_tensor_names_load_into_a_built_model():
    model = skipvlm.EASModel.from_pretrained(build_model("llama"), DATA / "eas_v1")
    old = load_file(DATA / "eas_v1" / ADAPTER_FILE)
    fresh = skipvlm.get_eas_model(build_model("llama"), model._config)
    fresh.load_trainable_state_dict(old)  # e.g. a training checkpoint written before the routes
    for (name, a), b in zip(
        fresh.adapter_state_dict().items(), model.adapter_state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


# --- the replace-PIA's input, the PIA design ablations and the FFN-PIA ---------------------------------


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_rms_input_starts_exactly_at_the_plain_skip_and_normed_input_does_not(arch):
    """replace_input='rms': a fresh model is the plain skip plan. The default 'normed' input feeds
    gamma_post * gamma_in * rms(h) to the MLP, which differs wherever gamma_in != 1 (METHODS §2)."""
    base = build_model(arch)
    parts = arch_facts(base).parts
    assert (parts.gain(get_layers(base)[1].get_submodule(parts.input_norm)) - 1).abs().max() > 0.1
    inputs = make_inputs(arch, lengths=(6, 3))
    plain = logits(skipvlm.apply_plan(copy.deepcopy(base), skipvlm.Plan(skip_attention=[1, 2])), inputs)
    rms = skipvlm.get_eas_model(
        copy.deepcopy(base), skipvlm.EASConfig(skip_attention=[1, 2], replace_input="rms")
    )
    torch.testing.assert_close(logits(rms, inputs), plain, rtol=0, atol=1e-5)
    normed = skipvlm.get_eas_model(base, skipvlm.EASConfig(skip_attention=[1, 2]))
    assert (logits(normed, inputs) - plain).abs().max() > 1e-2


# Each switch, with the plan it needs, for the round trip and the fresh-model checks.
SWITCHES = {
    "single_path": dict(single_path=True),
    "no_info_exchange": dict(info_exchange=False),
    "not_frozen": dict(freeze_pooled=False),
    "rms_input": dict(replace_input="rms"),
    "ffn_pia": dict(mlp_replace="pia", skip_mlp=[0, 2]),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_saves_and_loads_exactly(switch, tmp_path):
    model = randomize_adapters(build_eas("llava", **SWITCHES[switch]))
    inputs = make_inputs("llava", lengths=(6, 3))
    model.calibrate([inputs], progress=False)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = skipvlm.EASModel.from_pretrained(build_model("llava"), tmp_path)
    assert loaded.eas_config == model.eas_config and loaded.plan == model.plan
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    names = set(load_file(tmp_path / ADAPTER_FILE))
    if switch == "single_path":
        assert not any(".router." in k for k in names) and not any(".up.1." in k for k in names)
    if switch == "no_info_exchange":
        assert not any(".replace.pool." in k for k in names)
    if switch == "ffn_pia":
        assert {k.split(".adapters.")[0] for k in names if ".adapters.ffn." in k} == {"routes.0", "routes.2"}


def test_adapters_saved_before_the_switches_existed_still_load(tmp_path):
    model = randomize_adapters(build_eas("llama"))
    inputs = make_inputs("llama", lengths=(6, 3))
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    for name in ("single_path", "info_exchange", "freeze_pooled", "replace_input", "mlp_replace"):
        del meta["eas_config"][name]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = skipvlm.EASModel.from_pretrained(build_model("llama"), tmp_path)
    assert loaded.eas_config == model.eas_config == skipvlm.EASConfig(skip_attention=[1, 2])
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("switch", ["single_path", "no_info_exchange", "not_frozen"])
def test_design_switches_keep_a_fresh_model_where_the_default_starts(switch):
    """The ablations change what trains, not where training starts."""
    inputs = make_inputs("llama", lengths=(6, 3))
    reference = logits(build_eas("llama"), inputs)
    torch.testing.assert_close(
        logits(build_eas("llama", **SWITCHES[switch]), inputs), reference, rtol=0, atol=0
    )


def test_defaults_draw_the_same_initial_adapters_as_before_the_switches():
    """The FFN-PIAs are built after every other kind, so a default config's adapters are unchanged."""
    plain = build_eas("llama", skip_mlp=[3]).adapter_state_dict()
    with_ffn = build_eas("llama", skip_mlp=[3], mlp_replace="pia").adapter_state_dict()
    assert set(with_ffn) - set(plain) and all(".ffn." in k for k in set(with_ffn) - set(plain))
    for k, v in plain.items():
        assert torch.equal(with_ffn[k], v), k


def test_pooled_state_is_recomputed_every_step_only_when_not_frozen(monkeypatch):
    """freeze_pooled=False: the prefill (and training) is the frozen model's; each decoding step routes
    again from its own token (one router call per PIA and step); frozen: routed once, at prefill."""
    prompt = make_inputs("llama", lengths=(6,))
    frozen = randomize_adapters(build_eas("llama"))
    moving = randomize_adapters(build_eas("llama", freeze_pooled=False))
    torch.testing.assert_close(logits(moving, prompt), logits(frozen, prompt), rtol=0, atol=0)
    calls = []
    route = skipvlm.pia.PIABase.route

    def spy(self, pooled):
        calls.append(pooled.shape)
        return route(self, pooled)

    monkeypatch.setattr(skipvlm.pia.PIABase, "route", spy)
    counts = {}
    for name, model in (("frozen", frozen), ("moving", moving)):
        calls.clear()
        _, steps = greedy(model, prompt, 4)
        counts[name], counts[name + "_steps"] = len(calls), steps
    assert counts["frozen"] == 4  # 4 PIAs (2 replace, 2 adapt), routed at prefill only
    assert counts["moving"] == 4 * 4  # and again at each of the 3 decoding steps
    torch.testing.assert_close(counts["moving_steps"][:, 0], counts["frozen_steps"][:, 0], rtol=0, atol=0)
    assert (counts["moving_steps"][:, 1:] - counts["frozen_steps"][:, 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_fresh_ffn_pia_is_the_plain_mlp_skip_and_runs_no_mlp(arch):
    base = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    plain = skipvlm.apply_plan(copy.deepcopy(base), skipvlm.Plan(skip_attention=[1], skip_mlp=[1, 3]))
    model = skipvlm.get_eas_model(
        base, skipvlm.EASConfig(skip_attention=[1], skip_mlp=[1, 3], mlp_replace="pia", replace_input="rms")
    )
    assert sorted(model.adapters.ffn) == ["1", "3"] and sorted(model.adapters.replace) == []
    torch.testing.assert_close(logits(model, inputs), logits(plain, inputs), rtol=0, atol=0)
    randomize_adapters(model)
    ran = {"mlp": set(), "ffn": set()}
    for i, layer in enumerate(get_layers(model.base_model)):
        layer.mlp.down_proj.register_forward_hook(lambda *a, i=i: ran["mlp"].add(i))
    for i, ffn in model.adapters.ffn.items():
        ffn.token.register_forward_hook(lambda *a, i=int(i): ran["ffn"].add(i))
    assert (logits(model, inputs) - logits(plain, inputs)).abs().max() > 1e-3
    assert ran == {"mlp": {0, 2}, "ffn": {1, 3}}


def test_ffn_pia_trainable_parameters_grow_with_the_skipped_mlps():
    counts = [
        build_eas("llama", skip=(), skip_mlp=list(range(k)), mlp_replace="pia").trainable_parameters()[0]
        for k in range(4)
    ]
    ffn = sum(
        p.numel()
        for p in build_eas("llama", skip=(), skip_mlp=[0], mlp_replace="pia").adapters.ffn["0"].parameters()
    )
    assert [b - a for a, b in itertools.pairwise(counts)] == [ffn] * 3
    plain = [build_eas("llama", skip=(), skip_mlp=list(range(k))).trainable_parameters()[0] for k in range(4)]
    assert len(set(plain)) == 1


def test_a_fixed_ffn_pia_model_refuses_to_move_an_mlp_skip_without_one():
    model = build_eas("llama", skip=(), skip_mlp=[1], mlp_replace="pia")
    with pytest.raises(
        ValueError, match=r"layer\(s\) \[2\] has no FFN-PIA for its skipped MLP.*supernet=True"
    ):
        model.set_plan(skipvlm.Plan(skip_mlp=[2]))
    assert model.plan == skipvlm.Plan(skip_mlp=[1])


def test_ffn_pia_supernet_moves_its_mlp_skips():
    model = randomize_adapters(
        build_eas("llama", skip=(), supernet=True, candidates="attention_or_mlp", mlp_replace="pia")
    )
    adapters = model.adapters
    assert (len(adapters.replace), len(adapters.adapt), len(adapters.ffn)) == (4, 4, 4)
    inputs = make_inputs("llama", lengths=(5,))
    outs = []
    for plan in (skipvlm.Plan(skip_mlp=[0]), skipvlm.Plan(skip_attention=[2], skip_mlp=[3])):
        model.set_plan(plan)
        outs.append(logits(model, inputs))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_ffn_pia_costs_its_low_rank_map_in_place_of_the_mlp():
    config = skipvlm.EASConfig(skip_mlp=[1], mlp_replace="pia")
    base = build_model("llama")
    plan = config.plan()
    plain = skipvlm.cost.count_macs(base, 10, plan)
    replaced = skipvlm.cost.count_macs(base, 10, plan, mlp_replacement=config.mlp_replacement_macs(32))
    assert plain.layers[1]["mlp"] == 0 and replaced.layers[1]["mlp"] == 10 * 2 * 32 * 32
    assert replaced.layers[0]["mlp"] == 10 * 3 * 32 * 64
    assert skipvlm.EASConfig().mlp_replacement_macs(32) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replace_input": "gamma"}, r"replace_input must be one of \('normed', 'rms'\)"),
        ({"mlp_replace": "lora"}, r"mlp_replace must be one of \('none', 'pia'\)"),
        ({"single_path": 1}, "single_path must be true or false"),
        (
            {"mlp_replace": "pia", "supernet": True, "candidates": "layer"},
            "'layer' supernet skips whole layers",
        ),
        (
            {"mlp_replace": "pia", "supernet": True, "candidates": "attention"},
            r"'attention' supernet never skips one.*candidates='mlp' or 'attention_or_mlp'",
        ),
    ],
)
def test_switch_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skipvlm.EASConfig(**kwargs)


def test_ffn_replacement_with_no_mlp_skipped_warns_that_it_builds_nothing(caplog):
    with caplog.at_level("WARNING", logger="skipvlm.eas"):
        model = build_eas("llama", mlp_replace="pia")
    assert not model.adapters.ffn and "builds no FFN-PIA: its plan skips no MLP" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="skipvlm.eas"):
        build_eas("llama", skip_mlp=[3], mlp_replace="pia")
    assert "FFN-PIA" not in caplog.text


@pytest.mark.parametrize("replace_input", ["normed", "rms"])
def test_not_frozen_pias_route_each_decoding_step_from_their_own_input_token(replace_input, monkeypatch):
    """freeze_pooled=False: at a decoding step, the replace-PIA's pooled vector is its input for the new token
    (N_in(h) or rms(h)), and the adapt-PIA's is N_in(h): not the prompt's, not the hidden state."""
    model = randomize_adapters(build_eas("llama", freeze_pooled=False, replace_input=replace_input))
    layers = get_layers(model.base_model)
    hidden: dict[int, list] = {1: [], 3: []}  # layer 1: replace-PIA; layer 3: adapt-PIA
    for i, seen in hidden.items():  # a route's forward is (layer, h, step)
        model.decoder.routes[i].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[1]))
    pooled: dict[int, list] = {1: [], 3: []}
    pias = {model.adapters.replace["1"]: 1, model.adapters.adapt["3"]: 3}
    route = skipvlm.pia.PIABase.route

    def spy(self, p):
        if self in pias:
            pooled[pias[self]].append(p)
        return route(self, p)

    monkeypatch.setattr(skipvlm.pia.PIABase, "route", spy)
    greedy(model, make_inputs("llama", lengths=(6,)), 3)
    norm = layers[1].input_layernorm
    replace_in = (lambda h: skipvlm.adapters.rms(norm, h)) if replace_input == "rms" else norm
    expected = {
        1: [replace_in(h)[:, -1] for h in hidden[1]],
        3: [layers[3].input_layernorm(h)[:, -1] for h in hidden[3]],
    }
    for i in (1, 3):
        assert len(pooled[i]) == len(hidden[i]) == 3  # the prefill, then 2 decoding steps
        for got, want in zip(pooled[i][1:], expected[i][1:], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
