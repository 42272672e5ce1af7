"""transformers' calling conventions (skipvlm.compat): the cache under each keyword, and the guards."""

from __future__ import annotations

import warnings

import pytest
import torch

import skipvlm
from skipvlm import compat
from skipvlm.arch import get_decoder
from skipvlm.compat import DummyLayer, DynamicCache

from conftest import ALL_ARCHS, assert_cached_equals_recompute, build_model, make_inputs


def _decoder_logits(model, decoder, ids, mask, **kw):
    out = decoder(input_ids=ids, attention_mask=mask, **kw)
    return model.lm_head(out.last_hidden_state), out


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_decoder_uses_the_cache_under_either_keyword(name):
    """Prefill and two decode steps with the cache passed as `cache=` or `past_key_values=` give the
    logits of recomputing the whole sequence, and the kept layers hold keys and values."""
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    decoder = get_decoder(model)
    inputs = make_inputs("llama", lengths=(7, 5))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits, out = _decoder_logits(model, decoder, ids, mask, use_cache=True, **{name: cache})
        assert compat.output_cache(out) is cache
        for _ in range(2):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            logits, _ = _decoder_logits(model, decoder, nxt, mask, use_cache=True, **{name: cache})
            full, _ = _decoder_logits(model, decoder, ids, mask, use_cache=False)
            torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    assert isinstance(cache.layers[1], DummyLayer)
    n = ids.shape[1]
    assert [compat.layer_length(layer) for layer in cache.layers] == [n, 0, n, n]
    assert skipvlm.kv_cache_bytes(cache) > 0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_generate_under_a_plan_uses_the_cache(arch):
    """The regression behind transformers 5.24: `generate`'s own cache must be the one that fills."""
    model = skipvlm.apply_plan(build_model(arch), skipvlm.Plan(skip_attention=[0, 2]))
    inputs = make_inputs(arch, lengths=(6, 4))
    assert_cached_equals_recompute(model, inputs, steps=4)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = compat.output_cache(out)
    lengths = [compat.layer_length(layer) for layer in cache.layers]
    assert lengths[0] == lengths[2] == 0 and lengths[1] == lengths[3] == out.sequences.shape[1] - 1


def test_a_cache_under_an_unknown_keyword_raises():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match=r"keyword 'kv_cache'.*transformers .* is not supported"):
        get_decoder(model)(**inputs, kv_cache=DynamicCache(), use_cache=True)


def test_an_unknown_keyword_raises_instead_of_being_dropped():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    with pytest.raises(ValueError, match=r"keyword 'frobnicate'.*supported: 5\.23\.0 to 5\.24\.0"):
        get_decoder(model)(**make_inputs("llama"), frobnicate=3)


def test_two_different_caches_raise():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    with pytest.raises(ValueError, match="two different KV caches"):
        get_decoder(model)(**make_inputs("llama"), cache=DynamicCache(), past_key_values=DynamicCache())


def test_a_cache_that_does_not_grow_raises(monkeypatch):
    """If the attention modules stop receiving the cache (a renamed keyword), the forward raises
    instead of returning output computed without it."""
    model = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(skip_attention=[1]))
    monkeypatch.setattr(compat, "cache_kwargs", lambda cache: {})
    expected = r"KV cache was not used \(layers \[0, 2, 3\].*supported"
    with pytest.raises(RuntimeError, match=expected), torch.no_grad():
        model.generate(**make_inputs("llava"), max_new_tokens=2, do_sample=False)


def test_version_check_warns_outside_the_tested_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_version(compat.TESTED[0]) and compat.check_version(compat.TESTED[1])
    for outside in ("5.22.2", "5.25.0", "6.0.0"):
        with pytest.warns(UserWarning, match=r"tested with transformers 5\.23\.0 to 5\.24\.0"):
            assert not compat.check_version(outside)


def test_pyproject_bound_matches_the_tested_range():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("transformers"))
    assert spec == f"transformers>={compat.TESTED[0]},<{compat._UPPER}"
    pins = (root / "constraints.txt").read_text().splitlines()
    assert f"transformers=={compat.TESTED[1]}" in pins
