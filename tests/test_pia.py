"""PIA modules and their exact collapse / merge (shared/METHODS.md §2), checked against direct evaluation."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from skipvlm.data.labels import IGNORE_INDEX
from skipvlm.pia import (
    AdaptPIA,
    BlockDiagonalLinear,
    ReplacePIA,
    collapse_adapt,
    collapse_replace,
    fold_into_linear,
    pooled_prompt,
    prompt_mask_from_labels,
)

C, D = 32, 16


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def test_block_diagonal_structure_and_forward():
    up = randomize(BlockDiagonalLinear(D, C, groups=2))
    dense = up.dense()
    assert dense.shape == (C, D)
    assert dense[: C // 2, D // 2 :].abs().sum() == 0 and dense[C // 2 :, : D // 2].abs().sum() == 0
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(up(x), x @ dense.T + up.bias)
    assert sum(p.numel() for p in up.parameters()) == 2 * (C // 2) * (D // 2) + C
    with pytest.raises(ValueError, match="in_features=15 must be divisible by groups=2"):
        BlockDiagonalLinear(15, C)


@pytest.mark.parametrize("kind", [AdaptPIA, ReplacePIA])
def test_fresh_adapter_is_the_identity(kind):
    x, p = torch.randn(2, 7, C), torch.randn(2, C)
    adapter = kind(C, D).eval()
    torch.testing.assert_close(adapter(x, p), x, rtol=0, atol=0)


def test_adapter_validation():
    with pytest.raises(ValueError, match="rank 3 must be a positive multiple of groups=2"):
        AdaptPIA(C, 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ReplacePIA(C, D, temperature=0)


def test_router_uses_temperature():
    adapter = randomize(AdaptPIA(C, D, temperature=10.0))
    p = torch.randn(2, C)
    torch.testing.assert_close(adapter.route(p), torch.softmax(adapter.router(p) / 10.0, -1))


def test_adapt_collapse_is_exact():
    adapter = randomize(AdaptPIA(C, D, scale=0.7))
    x, p = torch.randn(1, 9, C), torch.randn(1, C)
    w = adapter.route(p)[0]
    affine = collapse_adapt(adapter, w)
    assert affine.U.shape == (C, D) and affine.V.shape == (D, C)
    torch.testing.assert_close(adapter(x, p), affine(x), rtol=0, atol=1e-5)


def test_replace_collapse_is_exact():
    adapter = randomize(ReplacePIA(C, 4 * 8, scale=1.3))
    x, p = torch.randn(1, 9, C), torch.randn(1, C)
    w, g = adapter.route(p)[0], adapter.pooled_path(p)[0]
    torch.testing.assert_close(adapter(x, p), collapse_replace(adapter, w, g)(x), rtol=0, atol=1e-5)


def _mlp_and_norms(seed=0):
    config = LlamaConfig(hidden_size=C, intermediate_size=48, rms_norm_eps=1e-6)
    mlp = randomize(LlamaMLP(config), seed)
    norm_in, norm_post = LlamaRMSNorm(C, 1e-6), LlamaRMSNorm(C, 1e-6)
    with torch.no_grad():
        norm_in.weight.uniform_(0.5, 1.5)
        norm_post.weight.uniform_(0.5, 1.5)
    return mlp, norm_in, norm_post


def test_replace_pia_folds_into_the_mlp_exactly():
    """h + MLP(gamma_post * y) == h + W_down(silu(W'_g rms(h) + b'_g) * (W'_u rms(h) + b'_u))."""
    mlp, norm_in, norm_post = _mlp_and_norms()
    adapter = randomize(ReplacePIA(C, D), seed=1)
    h = torch.randn(1, 6, C) * 3
    x = norm_in(h)
    p = pooled_prompt(x, torch.ones(1, 6, dtype=torch.bool))
    expected = h + mlp(norm_post.weight * adapter(x, p))

    affine = collapse_replace(adapter, adapter.route(p)[0], adapter.pooled_path(p)[0])
    rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    folded = {}
    for name in ("gate_proj", "up_proj"):
        folded[name] = fold_into_linear(
            getattr(mlp, name).weight, affine, pre_scale=norm_post.weight, post_scale=norm_in.weight
        )
    gate = rms @ folded["gate_proj"][0].T + folded["gate_proj"][1]
    up = rms @ folded["up_proj"][0].T + folded["up_proj"][1]
    got = h + mlp.down_proj(torch.nn.functional.silu(gate) * up)
    # fp32 rounding of outputs up to ~30 (h is scaled by 3): relative 1e-6 on top of 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_adapt_pia_folds_into_qkv_exactly_with_existing_bias():
    adapter = randomize(AdaptPIA(C, D), seed=2)
    q_proj = randomize(torch.nn.Linear(C, 24, bias=True), seed=3)
    x, p = torch.randn(1, 6, C), torch.randn(1, C)
    expected = q_proj(adapter(x, p))
    weight, bias = fold_into_linear(q_proj.weight, collapse_adapt(adapter, adapter.route(p)[0]), q_proj.bias)
    torch.testing.assert_close(x @ weight.T + bias, expected, rtol=0, atol=1e-5)


def test_fold_keeps_dtype_and_refuses_non_finite():
    adapter = randomize(AdaptPIA(C, D))
    affine = collapse_adapt(adapter, torch.tensor([0.5, 0.5]))
    weight, bias = fold_into_linear(torch.randn(8, C, dtype=torch.bfloat16), affine)
    assert weight.dtype == bias.dtype == torch.bfloat16
    affine.r[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fold_into_linear(torch.randn(8, C), affine)


def test_prompt_mask_excludes_answer_and_padding():
    ign = IGNORE_INDEX  # the collator's mark on prompt and padding
    labels = torch.tensor([[ign, ign, ign, 7, 8], [ign, ign, 5, 6, ign], [ign, ign, ign, ign, ign]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    mask = prompt_mask_from_labels(labels, attention)
    expected = [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert mask.int().tolist() == expected


def test_pooling_ignores_answer_and_padding_tokens():
    x = torch.randn(2, 5, C)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    pooled = pooled_prompt(x, mask)
    torch.testing.assert_close(pooled[0], x[0, 1:3].mean(0))
    changed = x.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), C) * 100
    torch.testing.assert_close(pooled_prompt(changed, mask), pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"example\(s\) \[1\] have no prompt token"):
        pooled_prompt(x, torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))


# --- the design ablations (the paper's PIA table) and the FFN-PIA ----------------------------------------


@pytest.mark.parametrize("kind", [AdaptPIA, ReplacePIA])
def test_single_path_pia_has_one_up_projection_and_no_router(kind):
    adapter = randomize(kind(C, D, paths=1))
    assert adapter.router is None and len(adapter.up) == 1 and adapter.calib_w.shape == (1,)
    assert not any(name.startswith("router") for name, _ in adapter.named_parameters())
    x, p = torch.randn(2, 7, C), torch.randn(2, C)
    torch.testing.assert_close(adapter.route(p), torch.ones(2, 1))
    # y = x + s (U h + c): the single path taken with weight 1
    token = adapter.down(x) if kind is AdaptPIA else adapter.token(x)
    h = token if kind is AdaptPIA else 0.5 * (adapter.pooled_path(p)[:, None] + token)
    torch.testing.assert_close(adapter(x, p), x + adapter.up[0](h), rtol=0, atol=1e-6)
    w = adapter.route(p[:1])[0]
    if kind is AdaptPIA:
        affine = collapse_adapt(adapter, w)
    else:
        affine = collapse_replace(adapter, w, adapter.pooled_path(p[:1])[0])
    torch.testing.assert_close(adapter(x[:1], p[:1]), affine(x[:1]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="1 or 2 up-projection paths, got paths=3"):
        kind(C, D, paths=3)


def test_replace_pia_without_information_exchange_has_no_pooled_path():
    adapter = randomize(ReplacePIA(C, D, info_exchange=False))
    assert adapter.pool is None and not any(n.startswith("pool") for n, _ in adapter.named_parameters())
    x, p, q = torch.randn(1, 9, C), torch.randn(1, C), torch.randn(1, C)
    torch.testing.assert_close(adapter.pooled_path(p), torch.zeros(1, D), rtol=0, atol=0)
    w = adapter.route(p)
    # the pooled vector reaches the output only through the router
    torch.testing.assert_close(adapter(x, p), adapter(x, q, w=w), rtol=0, atol=0)
    torch.testing.assert_close(
        adapter(x, p), collapse_replace(adapter, w[0], torch.zeros(D))(x), atol=1e-5, rtol=0
    )


def test_ffn_pia_is_the_replace_pia_branch_and_starts_at_zero():
    """F(x) = y - x: zero for a fresh adapter (the plain MLP skip), U V x + r once collapsed."""
    x, p = torch.randn(2, 7, C), torch.randn(2, C)
    torch.testing.assert_close(ReplacePIA(C, D).eval().residual(x, p), torch.zeros(2, 7, C), rtol=0, atol=0)
    adapter = randomize(ReplacePIA(C, D, scale=0.8))
    torch.testing.assert_close(adapter.residual(x, p), adapter(x, p) - x, rtol=0, atol=1e-6)
    w, g = adapter.route(p[:1])[0], adapter.pooled_path(p[:1])[0]
    affine = collapse_replace(adapter, w, g)
    branch = (x[:1] @ affine.V.T) @ affine.U.T + affine.r
    torch.testing.assert_close(adapter.residual(x[:1], p[:1]), branch, rtol=0, atol=1e-5)
