"""Re-parameterisation is exact: unmerged == per_example, static == forced calibration means == export."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm.adapters import LayerAdapters
from skipvlm.arch import get_decoder, get_layers
from skipvlm.cost import count_macs
from skipvlm.export import PLAN_KEY
from skipvlm.merge import AffineMLP, PerExampleRoute
from skipvlm.pia import PIABase
from skipvlm.runtime import RemovedAttention
from skipvlm.search import Candidates

from conftest import build_eas, build_model, greedy, logits, make_inputs, randomize_adapters

ATOL = 1e-4
EAS_ARCHS = ("llama", "llava", "qwen2", "qwen3_vl")
EAS_ARCHS += ("gemma3_text", "gemma3")  # sandwich norms, gain 1 + weight
DECODE_STEPS = 8


def trained(arch: str, skip=(1, 2), **cfg) -> tuple[skipvlm.EASModel, dict]:
    """An EAS model with random non-zero adapters, calibrated on a padded batch; and that batch."""
    model = randomize_adapters(build_eas(arch, skip=skip, **cfg))
    batch = make_inputs(arch, lengths=(7, 4), seed=3)
    model.calibrate([batch, make_inputs(arch, lengths=(5,), seed=4)], progress=False)
    return model, batch


def assert_no_adapters_left(model, skipped):
    assert not any(isinstance(m, (PIABase, LayerAdapters)) for m in model.modules())
    assert not any(".routes." in n for n, _ in model.named_parameters())
    for i, layer in enumerate(get_layers(model)):
        attention = layer.self_attn
        assert isinstance(attention, RemovedAttention) == (i in skipped)
        if i in skipped:
            assert sum(p.numel() for p in attention.parameters()) == 0


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_per_example_merge_equals_unmerged(arch):
    model, _ = trained(arch)
    prompt = make_inputs(arch, lengths=(6,), seed=5)
    prefill = logits(model, prompt)
    sequences, steps = greedy(model, prompt, DECODE_STEPS)

    merged = copy.deepcopy(model).merge_and_unload(mode="per_example")
    assert_no_adapters_left(merged, skipped=(1, 2))
    torch.testing.assert_close(logits(merged, prompt), prefill, rtol=0, atol=ATOL)
    merged_sequences, merged_steps = greedy(merged, prompt, DECODE_STEPS)
    assert torch.equal(merged_sequences, sequences)
    torch.testing.assert_close(merged_steps, steps, rtol=0, atol=ATOL)

    # a second prompt is re-merged with its own router weights, not the first prompt's
    other = make_inputs(arch, lengths=(4,), seed=9)
    torch.testing.assert_close(logits(merged, other), logits(model, other), rtol=0, atol=ATOL)


def test_per_example_merge_refuses_batches():
    model, batch = trained("llama")
    merged = model.merge_and_unload(mode="per_example")
    with pytest.raises(ValueError, match=r"batch size 1, got 2.*mode='static'"):
        logits(merged, batch)


@pytest.mark.parametrize("arch", EAS_ARCHS)
def test_static_merge_equals_unmerged_with_calibration_means(arch):
    model, batch = trained(arch)
    model.adapters.use_calibration = True
    forced = logits(model, batch)
    forced_sequences, forced_steps = greedy(model, batch, DECODE_STEPS)
    model.adapters.use_calibration = False
    assert (logits(model, batch) - forced).abs().max() > 1e-4  # the means differ from each prompt's own

    merged = model.merge_and_unload(mode="static")
    assert_no_adapters_left(merged, skipped=(1, 2))
    assert get_decoder(merged).plan == skipvlm.Plan(skip_attention=[1, 2])
    torch.testing.assert_close(logits(merged, batch), forced, rtol=0, atol=ATOL)
    sequences, steps = greedy(merged, batch, DECODE_STEPS)
    assert torch.equal(sequences, forced_sequences)
    torch.testing.assert_close(steps, forced_steps, rtol=0, atol=ATOL)


def test_static_merge_needs_calibration():
    model = randomize_adapters(build_eas("llama"))
    with pytest.raises(ValueError, match=r"no calibration means.*model.calibrate"):
        model.merge_and_unload(mode="static")
    with pytest.raises(ValueError, match="unknown merge mode 'fast'"):
        model.merge_and_unload(mode="fast")


def test_merge_refuses_non_finite_adapters():
    model, _ = trained("llama")
    with torch.no_grad():
        model.adapters.replace["1"].token.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(mode="static")


def test_merged_model_cannot_run_removed_attentions():
    model, _ = trained("llama")
    merged = model.merge_and_unload(mode="static")
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] had their attention removed"):
        skipvlm.apply_plan(merged, skipvlm.Plan(skip_attention=[2]))
    with pytest.raises(ValueError, match="cannot run as the stock model"):
        skipvlm.apply_plan(merged, skipvlm.Plan())


def test_merge_keeps_the_dtype_and_adds_biases_only_where_merged():
    model, _ = trained("llama", skip=(2,))
    merged = model.merge_and_unload(mode="static")
    layers = get_layers(merged)
    assert layers[2].mlp.gate_proj.bias is not None and layers[2].mlp.down_proj.bias is None
    assert layers[0].self_attn.q_proj.bias is not None and layers[0].self_attn.o_proj.bias is None
    assert torch.equal(layers[2].post_attention_layernorm.weight, torch.ones(32))
    assert {p.dtype for p in merged.parameters()} == {torch.float32}


def test_supernet_merges_only_the_adapters_its_plan_uses():
    model, batch = trained("llama", skip=(0, 3), supernet=True)
    model.adapters.use_calibration = True
    forced = logits(model, batch)
    merged = model.merge_and_unload(mode="static")
    torch.testing.assert_close(logits(merged, batch), forced, rtol=0, atol=ATOL)
    assert [
        i for i, layer in enumerate(get_layers(merged)) if isinstance(layer.self_attn, RemovedAttention)
    ] == [0, 3]


# --- export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_exported_checkpoint_loads_in_stock_transformers_and_equals_static(arch, tmp_path):
    model, batch = trained(arch)
    unmerged = logits(model, batch)
    model.export_merged(tmp_path / "merged")
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=0)  # export leaves it alone
    stock_cls = type(model.base_model)
    model.adapters.use_calibration = True
    forced = logits(model, batch)
    static = logits(copy.deepcopy(model).merge_and_unload("static"), batch)

    stock = stock_cls.from_pretrained(tmp_path / "merged").eval()
    assert type(get_decoder(stock)).__module__.startswith("transformers.")
    text = stock.config.get_text_config(decoder=True)
    assert text.mlp_bias and text.attention_bias
    torch.testing.assert_close(logits(stock, batch), static, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(stock, batch), forced, rtol=0, atol=ATOL)

    fast = skipvlm.load_pretrained(tmp_path / "merged").eval()
    assert skipvlm.current_plan(fast) == skipvlm.Plan(skip_attention=[1, 2])
    assert getattr(fast.config, PLAN_KEY)["skip_attention"] == [1, 2]
    assert_no_adapters_left(fast, skipped=(1, 2))
    torch.testing.assert_close(logits(fast, batch), static, rtol=0, atol=ATOL)


def test_export_replaces_its_own_files_and_keeps_the_rest(tmp_path):
    model, _ = trained("llama")
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text("{}")
    model.export_merged(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert "skipvlm_plan" in (target / "config.json").read_text()
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.parametrize(
    ("arch", "what"),
    [("qwen2", "no MLP biases"), ("mistral", "no MLP biases"), ("gemma3_text", "no MLP biases")],
)
def test_export_names_architectures_a_stock_config_cannot_hold(arch, what, tmp_path):
    model, _ = trained(arch)
    with pytest.raises(ValueError, match=rf"stock {arch} checkpoint .*{what}"):
        model.export_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_qwen2_adapt_only_model_exports(tmp_path):
    model, batch = trained("qwen2", skip=())
    model.export_merged(tmp_path / "merged")
    model.adapters.use_calibration = True
    stock = tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(stock, batch), logits(model, batch), rtol=0, atol=ATOL)


def test_qwen3_vl_exports_adapt_only_and_names_its_missing_mlp_biases(tmp_path):
    model, _ = trained("qwen3_vl")
    with pytest.raises(ValueError, match=r"stock qwen3_vl_text checkpoint \(qwen3_vl\) has no MLP biases"):
        model.export_merged(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    model, batch = trained("qwen3_vl", skip=())
    model.export_merged(tmp_path / "merged")
    model.adapters.use_calibration = True
    stock = tf.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert stock.config.text_config.attention_bias
    torch.testing.assert_close(logits(stock, batch), logits(model, batch), rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma3"])
def test_gemma3_adapt_only_model_exports_and_loads_in_stock_transformers(arch, tmp_path):
    model, batch = trained(arch, skip=())
    model.export_merged(tmp_path / "merged")
    model.adapters.use_calibration = True
    stock = type(model.base_model).from_pretrained(tmp_path / "merged").eval()
    assert stock.config.get_text_config(decoder=True).attention_bias
    torch.testing.assert_close(logits(stock, batch), logits(model, batch), rtol=0, atol=ATOL)


def test_gemma3_replace_merge_sets_the_pre_feedforward_gain_to_one():
    model, batch = trained("gemma3_text")
    model.adapters.use_calibration = True
    forced = logits(model, batch)
    merged = copy.deepcopy(model).merge_and_unload("static")
    for i in (1, 2):
        layer = get_layers(merged)[i]
        assert torch.equal(layer.pre_feedforward_layernorm.weight, torch.zeros(32))  # gain 1 + 0
        assert layer.post_feedforward_layernorm.weight.abs().min() > 0  # the output norm stays
    torch.testing.assert_close(logits(merged, batch), forced, rtol=0, atol=ATOL)


def test_load_pretrained_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        skipvlm.load_pretrained(tmp_path)


def test_per_example_merger_is_registered_and_holds_no_state_dict_entries():
    model, _ = trained("llama")
    keys_before = {k for k in model.base_model.state_dict() if ".routes." not in k}
    merged = model.merge_and_unload(mode="per_example")
    routes = get_decoder(merged).routes
    assert all(isinstance(routes[i], PerExampleRoute) for i in range(4))
    assert not any(".routes." in k for k in merged.state_dict())
    attention_keys = {k for k in keys_before if ".1.self_attn." in k or ".2.self_attn." in k}
    assert attention_keys and not attention_keys & set(merged.state_dict())


def test_bf16_model_merges_in_its_dtype():
    model = randomize_adapters(build_eas("llama", dtype=torch.bfloat16), std=0.2)
    assert {p.dtype for p in model.adapters.parameters()} == {torch.bfloat16}
    batch = make_inputs("llama", lengths=(7, 4))
    model.calibrate([batch], progress=False)
    assert model.adapters.replace["1"].calib_n.dtype == torch.long
    model.adapters.use_calibration = True
    forced = logits(model, batch).float()
    # What the adapters change: the same skips without them (a merge that dropped them would give this).
    skipped = skipvlm.apply_plan(
        build_model("llama", dtype=torch.bfloat16), skipvlm.Plan(skip_attention=[1, 2])
    )
    effect = (forced - logits(skipped, batch).float()).abs().max()
    tolerance = 0.02  # bf16 rounding: a few ulps of logits of magnitude ~0.4 (observed error ~0.004)
    assert effect > 5 * tolerance
    merged = model.merge_and_unload("static")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    got = logits(merged, batch).float()
    assert (got - forced).abs().max() < tolerance


def test_a_merged_model_says_its_adapters_are_gone(tmp_path):
    model, _ = trained("llama")
    model.merge_and_unload("static")
    with pytest.raises(ValueError, match="already merged by merge_and_unload"):
        model.export_merged(tmp_path / "m")


def test_a_merged_model_refuses_to_save_or_merge_its_adapters_again(tmp_path):
    for mode in ("per_example", "static"):
        model, _ = trained("llama")
        model.merge_and_unload(mode)
        with pytest.raises(ValueError, match="already merged"):
            model.adapters  # noqa: B018
        with pytest.raises(ValueError, match="already merged"):
            model.save_pretrained(tmp_path / mode)
        with pytest.raises(ValueError, match="already merged"):
            model.merge_and_unload("static")


# --- the PIA design ablations and the FFN-PIA merge exactly (or refuse to) --------------------------------

# Every switch that keeps PIA affine, with the plan it runs (skip_attention, and skip_mlp for FFN-PIAs).
AFFINE_SWITCHES = {
    "single_path": dict(single_path=True),
    "no_info_exchange": dict(info_exchange=False),
    "rms_input": dict(replace_input="rms"),
    "ffn_pia": dict(mlp_replace="pia", skip_mlp=[0, 2]),  # layer 2: attention and MLP both skipped
    "ffn_pia_no_adapt": dict(mlp_replace="pia", skip_mlp=[3], adapt_layers="none"),
    "all_at_once": dict(
        single_path=True, info_exchange=False, replace_input="rms", mlp_replace="pia", skip_mlp=[3]
    ),
}


@pytest.mark.parametrize("arch", ["llama", "llava", "gemma3_text"])
@pytest.mark.parametrize("switch", AFFINE_SWITCHES)
def test_every_affine_design_switch_merges_exactly(arch, switch):
    """unmerged == per_example merge (prefill and decoding, a second prompt re-merged) and calibration
    means == static merge, for each ablation switch and the FFN replacement."""
    cfg = AFFINE_SWITCHES[switch]
    model, batch = trained(arch, **cfg)
    plan = model.plan
    prompt = make_inputs(arch, lengths=(6,), seed=5)
    sequences, steps = greedy(model, prompt, 4)
    merged = copy.deepcopy(model).merge_and_unload(mode="per_example")
    torch.testing.assert_close(logits(merged, prompt), logits(model, prompt), rtol=0, atol=ATOL)
    merged_sequences, merged_steps = greedy(merged, prompt, 4)
    assert torch.equal(merged_sequences, sequences)
    torch.testing.assert_close(merged_steps, steps, rtol=0, atol=ATOL)
    other = make_inputs(arch, lengths=(4,), seed=9)
    torch.testing.assert_close(logits(merged, other), logits(model, other), rtol=0, atol=ATOL)

    model.adapters.use_calibration = True
    forced = logits(model, batch)
    static = model.merge_and_unload("static")
    assert_no_adapters_left(static, skipped=plan.skip_attention)
    torch.testing.assert_close(logits(static, batch), forced, rtol=0, atol=ATOL)
    if "mlp_replace" in cfg:  # the FFN-PIAs now run as low-rank MLPs
        assert skipvlm.current_plan(static) == plan.with_skips(skip_mlp=[])
        for i in plan.skip_mlp:
            mlp = get_layers(static)[i].mlp
            assert isinstance(mlp, AffineMLP) and mlp.down.weight.shape == (32, 32)  # rank d_r = 32


def test_rms_input_fold_has_no_input_gain_and_exports(tmp_path):
    """With replace_input='rms' the fold drops diag(gamma_in): a fold that kept it would be off by it."""
    model, batch = trained("llama", replace_input="rms")
    model.export_merged(tmp_path / "merged")
    model.adapters.use_calibration = True
    stock = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(stock, batch), logits(model, batch), rtol=0, atol=ATOL)


def test_ffn_pia_model_refuses_stock_export(tmp_path):
    model, _ = trained("llama", mlp_replace="pia", skip_mlp=[0])
    with pytest.raises(ValueError, match=r"skips MLPs.*FFN-PIAs"):
        model.export_merged(tmp_path / "m")


def test_models_that_re_pool_every_step_refuse_every_merge(tmp_path):
    model, _ = trained("llama", freeze_pooled=False)
    fix = r"freeze_pooled=False.*not one affine map.*serve it unmerged, or train it with freeze_pooled=True"
    for mode in ("static", "per_example"):
        with pytest.raises(ValueError, match=fix):
            model.merge_and_unload(mode)
    with pytest.raises(ValueError, match=fix):
        model.export_merged(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert len(model.adapters.replace) == 2  # nothing was merged


@pytest.mark.parametrize("kind", ["mlp", "attention_or_mlp"])
def test_ffn_pia_supernets_merge_the_plan_they_run(kind):
    model, batch = trained("llama", skip=(), supernet=True, candidates=kind, mlp_replace="pia")
    assert len(model.adapters.ffn) == 4
    plan = Candidates(kind, 4).plan([1, 3] if kind == "mlp" else [1, 6])  # attention_or_mlp: attn 1, mlp 2
    model.set_plan(plan)
    model.calibrate([batch], progress=False)
    model.adapters.use_calibration = True
    forced = logits(model, batch)
    config = model.eas_config
    unmerged = count_macs(
        model.base_model, 10, plan, mlp_replacement=config.mlp_replacement_macs(model.config.hidden_size)
    )
    merged = model.merge_and_unload("static")
    torch.testing.assert_close(logits(merged, batch), forced, rtol=0, atol=ATOL)
    assert isinstance(get_layers(merged)[plan.skip_mlp[0]].mlp, AffineMLP)
    # the merged model's MACs count each low-rank MLP, 2*C*d_r per token, not the 3*C*F it replaced
    c, f = merged.config.hidden_size, merged.config.intermediate_size
    report = count_macs(merged, 10, skipvlm.current_plan(merged))
    for i, layer in enumerate(report.layers):
        expected = 10 * 2 * c * config.replace_dim if i in plan.skip_mlp else 10 * 3 * c * f
        assert layer["mlp"] == expected
    assert report.mlp == unmerged.mlp
