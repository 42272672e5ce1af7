"""The README's model claims, each against a stock reference: Mistral's sliding window with prompts longer
than the window, LLaVA with a Qwen2 or Mistral text model, several images per prompt, Qwen2-VL video
tokens."""

from __future__ import annotations

import pytest
import torch

import skipvlm
from skipvlm.arch import arch_facts, get_decoder
from skipvlm.compat import output_cache

from conftest import (
    BOS,
    IMAGE_TOKEN,
    LLAVA_IMAGE_TOKENS,
    PAD,
    QWEN_GRID,
    QWEN_IMAGE_TOKENS,
    QWEN_PATCH_DIM,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    assert_cached_equals_recompute,
    build_model,
    greedy,
    logits,
    make_inputs,
    masked_reference,
    zero_out,
)

# --- Mistral's sliding window --------------------------------------------------------------------------

WINDOW = 4


def long_prompt(length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch of a ``length``-token prompt and a shorter one: both longer than the window."""
    return make_inputs("mistral", lengths=(length, length - 4), seed=seed)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mistral_prompt_longer_than_the_sliding_window(attn):
    model = build_model("mistral", attn=attn, sliding_window=WINDOW)
    inputs = long_prompt()
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    expected = logits(model, inputs)
    # The window matters here: the same weights without it give other logits.
    unlimited = build_model("mistral", attn=attn, sliding_window=None)
    assert (logits(unlimited, inputs) - expected).abs().max() > 1e-3

    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    get_decoder(model).plan = skipvlm.Plan()  # the runtime's own loop, nothing skipped
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-6)

    reference = zero_out(build_model("mistral", attn=attn, sliding_window=WINDOW), 1, "attention")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=1e-5)
    # Decoding well past the window: the cache keeps what the window needs and no more than the stock one.
    tokens, step_logits = greedy(model, inputs, steps=6)
    ref_tokens, ref_logits = greedy(reference, inputs, steps=6)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(step_logits, ref_logits, rtol=0, atol=1e-5)
    assert_cached_equals_recompute(model, inputs, steps=6)


# --- LLaVA with a Qwen2 or a Mistral text model ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["llava_qwen2", "llava_mistral"])
def test_llava_with_another_text_model_skips_and_withdraws_visual_tokens(arch):
    model = build_model(arch)
    assert arch_facts(model).text_model_type == arch.removeprefix("llava_")
    inputs = make_inputs(arch, lengths=(6, 3))
    reference = logits(zero_out(model, 2, "attention"), inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
    torch.testing.assert_close(logits(model, inputs), reference, rtol=0, atol=1e-5)

    visual = inputs["input_ids"] == IMAGE_TOKEN
    text = inputs["attention_mask"].bool() & ~visual
    skipvlm.apply_plan(model, skipvlm.Plan())
    reference = masked_reference(model, inputs, 2, visual)
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=2))
    torch.testing.assert_close(logits(model, inputs)[text], reference[text], rtol=0, atol=1e-5)
    assert_cached_equals_recompute(model, inputs, steps=4)


# --- several images, and video ---------------------------------------------------------------------------


def multimodal_batch(arch: str, rows: list[list[str]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch; each row is a list of parts: "t" (two text tokens), "image" or "video"."""
    gen = torch.Generator().manual_seed(seed)
    ids_rows, types_rows, pixels, grids, video_pixels, video_grids = [], [], [], [], [], []
    patches = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2]
    for parts in rows:
        ids, types = [BOS], [0]
        for part in parts:
            if part == "t":
                ids += torch.randint(3, IMAGE_TOKEN, (2,), generator=gen).tolist()
                types += [0, 0]
            elif arch == "llava":
                assert part == "image"
                ids += [IMAGE_TOKEN] * LLAVA_IMAGE_TOKENS
                types += [1] * LLAVA_IMAGE_TOKENS
                pixels.append(torch.randn(1, 3, 16, 16, generator=gen))
            else:
                token, kind = (IMAGE_TOKEN, 1) if part == "image" else (VIDEO_TOKEN, 2)
                ids += [VISION_START] + [token] * QWEN_IMAGE_TOKENS + [VISION_END]
                types += [0] + [kind] * QWEN_IMAGE_TOKENS + [0]
                values = torch.randn(patches, QWEN_PATCH_DIM, generator=gen)
                (pixels if part == "image" else video_pixels).append(values)
                (grids if part == "image" else video_grids).append(QWEN_GRID)
        ids_rows.append(ids)
        types_rows.append(types)
    width = max(len(r) for r in ids_rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mm_types = torch.zeros((len(rows), width), dtype=torch.int)
    for b, (ids, types) in enumerate(zip(ids_rows, types_rows, strict=True)):
        input_ids[b, width - len(ids) :] = torch.tensor(ids)
        mm_types[b, width - len(ids) :] = torch.tensor(types)
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long()}
    if arch == "llava":
        batch["pixel_values"] = torch.cat(pixels)
        return batch
    batch["mm_token_type_ids"] = mm_types
    if pixels:
        batch["pixel_values"], batch["image_grid_thw"] = torch.cat(pixels), torch.tensor(grids)
    if video_pixels:
        batch["pixel_values_videos"] = torch.cat(video_pixels)
        batch["video_grid_thw"] = torch.tensor(video_grids)
    return batch


def one_row(arch: str, batch: dict[str, torch.Tensor], rows: list[list[str]], b: int):
    """Row ``b`` of a :func:`multimodal_batch` of ``rows`` alone: its padding removed, its own images and
    videos."""
    keep = batch["attention_mask"][b].bool()
    names = ("input_ids", "attention_mask", "mm_token_type_ids")
    out = {k: batch[k][b : b + 1, keep] for k in names if k in batch}
    patches = 1 if arch == "llava" else QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2]  # rows of pixels per item
    for part, pixels, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        before, mine = sum(r.count(part) for r in rows[:b]), rows[b].count(part)
        if mine:
            out[pixels] = batch[pixels][before * patches : (before + mine) * patches]
            if grid in batch:
                out[grid] = batch[grid][before : before + mine]
    return out


def assert_rows_generate_alone_as_in_the_batch(model, arch, batch, rows, steps: int = 4) -> None:
    tokens, step_logits = greedy(model, batch, steps=steps)
    for b in range(len(rows)):
        alone_tokens, alone_logits = greedy(model, one_row(arch, batch, rows, b), steps=steps)
        assert torch.equal(tokens[b], alone_tokens[0])
        torch.testing.assert_close(step_logits[b], alone_logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_several_images_per_prompt_all_leave(arch):
    rows = [["t", "image", "t", "image", "t"], ["t", "image", "t"]]
    model = build_model(arch)
    batch = multimodal_batch(arch, rows, seed=3)
    visual = batch["input_ids"] == IMAGE_TOKEN
    per_image = LLAVA_IMAGE_TOKENS if arch == "llava" else QWEN_IMAGE_TOKENS
    assert visual.sum(1).tolist() == [2 * per_image, per_image]
    text = batch["attention_mask"].bool() & ~visual
    reference = masked_reference(model, batch, 2, visual)
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=2))
    torch.testing.assert_close(logits(model, batch)[text], reference[text], rtol=0, atol=1e-5)
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    # both images of row 0 left: from layer 2 on, the cache holds the widest row's text tokens
    assert [layer.keys.shape[-2] for layer in cache.layers[2:]] == [int(text.sum(1).max())] * 2
    assert_rows_generate_alone_as_in_the_batch(model, arch, batch, rows)

    # FastV ranks the visual tokens of all the images of a prompt together: half of 32 stay in row 0.
    skipvlm.apply_plan(model, skipvlm.Plan(fastv_layer=2, fastv_ratio=0.5))
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    assert cache.layers[2].keys.shape[-2] == batch["input_ids"].shape[1] - per_image


def test_qwen2_vl_video_tokens_leave_like_image_tokens():
    rows = [["t", "video", "t", "image", "t"], ["t", "video", "t"]]
    model = build_model("qwen2_vl")
    batch = multimodal_batch("qwen2_vl", rows, seed=4)
    ids = batch["input_ids"]
    visual = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    assert (ids == VIDEO_TOKEN).sum(1).tolist() == [QWEN_IMAGE_TOKENS] * 2
    text = batch["attention_mask"].bool() & ~visual
    reference = masked_reference(model, batch, 1, visual)
    # withdrawing the image alone is not enough: the video's tokens matter to the text after them
    only_images = masked_reference(model, batch, 1, ids == IMAGE_TOKEN)
    assert (only_images[text] - reference[text]).abs().max() > 1e-3
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=1))
    torch.testing.assert_close(logits(model, batch)[text], reference[text], rtol=0, atol=1e-5)
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    assert [layer.keys.shape[-2] for layer in cache.layers[1:]] == [int(text.sum(1).max())] * 3
    assert_rows_generate_alone_as_in_the_batch(model, "qwen2_vl", batch, rows)
