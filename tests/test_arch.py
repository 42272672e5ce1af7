"""Architecture facts are read from the config alone, for every supported family."""

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm.arch import arch_facts, get_decoder, get_layers

from conftest import ALL_ARCHS, IMAGE_TOKEN, NUM_LAYERS, build_config, build_model, text_config_kwargs

EXPECTED = {
    "llama": ("model", "default", None),
    "mistral": ("model", "default", None),
    "qwen2": ("model", "default", None),
    "llava": ("model.language_model", "default", IMAGE_TOKEN),
    "qwen2_vl": ("model.language_model", "mrope", IMAGE_TOKEN),
    "qwen2_5_vl": ("model.language_model", "mrope", IMAGE_TOKEN),
    "qwen3_vl": ("model.language_model", "mrope_text", IMAGE_TOKEN),
    "gemma3_text": ("model", "default", None),
    "gemma3": ("model.language_model", "default", IMAGE_TOKEN),
}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_facts_from_config_alone(arch):
    facts = arch_facts(build_config(arch))
    path, rope, image_token = EXPECTED[arch]
    assert (facts.decoder_path, facts.rope, facts.image_token_id) == (path, rope, image_token)
    assert facts.num_layers == NUM_LAYERS
    assert (facts.hidden_size, facts.intermediate_size, facts.head_dim) == (32, 64, 8)
    assert (facts.num_attention_heads, facts.num_key_value_heads) == (4, 2)
    assert len(facts.layer_types) == NUM_LAYERS
    assert facts.is_multimodal == (image_token is not None)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layers_and_submodules_resolve(arch):
    model = build_model(arch)
    facts = arch_facts(model)
    layers = get_layers(model)
    assert len(layers) == NUM_LAYERS
    assert get_decoder(model).layers is layers
    for layer in layers:
        parts = facts.parts
        names = (parts.attention, parts.mlp, parts.input_norm, parts.pre_mlp_norm)
        for name in (*names, parts.attention_out_norm, parts.mlp_out_norm):
            assert name is None or hasattr(layer, name)
    # Same object that transformers' own accessor returns.
    assert model.get_decoder().layers is layers


def test_mistral_sliding_window_is_a_layer_type():
    assert set(arch_facts(build_config("mistral")).layer_types) == {"sliding_attention"}
    assert set(arch_facts(build_config("llama")).layer_types) == {"full_attention"}


def test_llava_with_qwen2_text_model_is_supported():
    llava = build_config("llava")
    config = tf.LlavaConfig(
        vision_config=llava.vision_config, text_config=tf.Qwen2Config(**text_config_kwargs())
    )
    assert arch_facts(config).text_model_type == "qwen2"


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(skipvlm.UnsupportedModelError) as err:
        arch_facts(gpt2)
    msg = str(err.value)
    assert "'gpt2'" in msg
    for cls in ("LlamaForCausalLM", "Qwen2VLForConditionalGeneration", "LlavaForConditionalGeneration"):
        assert cls in msg


def test_unsupported_text_model_inside_llava():
    config = build_config("llava")
    config.text_config = tf.GPT2Config(n_layer=1, n_embd=8, n_head=2)
    with pytest.raises(skipvlm.UnsupportedModelError, match="'llava' with a 'gpt2' text model"):
        arch_facts(config)


def test_bare_backbone_is_refused_with_a_hint():
    backbone = tf.LlamaModel(build_config("llama"))
    with pytest.raises(skipvlm.UnsupportedModelError, match="ForCausalLM"):
        get_layers(backbone)


def test_non_model_input_is_a_type_error():
    with pytest.raises(TypeError, match="transformers model or config"):
        arch_facts("llama")


def test_gemma3_layer_parts_name_the_sandwich_norms_and_their_gain():
    facts = arch_facts(build_config("gemma3"))
    parts = facts.parts
    assert (parts.pre_mlp_norm, parts.attention_out_norm, parts.mlp_out_norm) == (
        "pre_feedforward_layernorm",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
    )
    layer = get_layers(build_model("gemma3"))[0]
    x = torch.randn(2, 3, 32)
    norm = layer.pre_feedforward_layernorm
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), rms * parts.gain(norm))  # Gemma's gain is 1 + weight
    assert set(facts.layer_types) == {"sliding_attention", "full_attention"}
    # Llama's pre-MLP norm is its post-attention norm, with gain = weight and no output norms.
    llama = arch_facts(build_config("llama")).parts
    assert (llama.pre_mlp_norm, llama.attention_out_norm, llama.mlp_out_norm, llama.gain_offset) == (
        "post_attention_layernorm",
        None,
        None,
        0.0,
    )
