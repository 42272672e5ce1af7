"""DyVTE: routers train on a frozen tiny model, save and load, and exit per example at inference."""

from __future__ import annotations

import pytest
import torch

import skipvlm
from skipvlm.arch import arch_facts
from skipvlm.data import ChatCollator
from skipvlm.tokens.dyvte import after_image, router_features

from conftest import (
    IMAGE_TOKEN,
    assert_batch_equals_rows,
    build_model,
    colour_examples,
    greedy,
    logits,
    make_inputs,
    toy_parts,
)


def test_routers_train_on_a_frozen_model_and_round_trip(tmp_path):
    model, processor = toy_parts(num_layers=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    config = skipvlm.DyVTEConfig(steps=60, batch_size=4, layers_per_batch=3, max_new_tokens=3)
    routers = skipvlm.train_dyvte(
        model, colour_examples(8), ChatCollator(processor), config, output_dir=tmp_path / "r", progress=False
    )
    report = routers.report
    assert routers.layers == [1, 2, 3]
    assert report["samples"] == 2 * 3 * 4  # two batches, three layers each, four examples
    assert sum(v["total"] for v in report["exit_labels_per_layer"].values()) == report["samples"]
    assert report["final_loss"] < 0.69  # below the loss of a router that knows nothing (ln 2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # the model is frozen

    loaded = skipvlm.DyVTERouters.load(tmp_path / "r")
    assert loaded.report == report
    for (name, a), b in zip(routers.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    batch = ChatCollator(processor)(colour_examples(3, seed=5), train=False)
    expected = expected_exits(model, routers, batch, 0.5)
    skipvlm.apply_plan(model, skipvlm.Plan(dyvte=str(tmp_path / "r"), dyvte_threshold=0.5))
    with torch.no_grad():
        model(**batch)
    assert skipvlm.exit_layers(model) == expected


def hand_features(
    hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_token: int
) -> torch.Tensor:
    """The router input written out row by row: [rms(mean of the real text tokens after the last visual
    token) ; rms(last token)], the last token standing in for the mean when no text follows the image."""

    def rms(x):
        return x / torch.sqrt(x.pow(2).mean() + 1e-6)

    rows = []
    for b in range(hidden.shape[0]):
        images = [t for t in range(ids.shape[1]) if ids[b, t] == image_token]
        after = [
            t
            for t in range(ids.shape[1])
            if images and t > images[-1] and mask[b, t] and ids[b, t] != image_token
        ]
        last = hidden[b, -1].double()
        mean = hidden[b, after].double().mean(0) if after else last
        rows.append(torch.cat([rms(mean), rms(last)]))
    return torch.stack(rows).float()


def expected_exits(model, routers, batch, threshold: float) -> list[int]:
    """Each example's exit: the first router layer whose probability exceeds ``threshold`` on the stock
    model's input of that layer (nothing has left before it), else the number of layers."""
    facts = arch_facts(model)
    with torch.no_grad(), skipvlm.use_plan(model, skipvlm.Plan()):
        states = model(**batch, output_hidden_states=True).hidden_states  # input of layer l at [l]
        probs = {
            i: torch.sigmoid(
                routers(
                    i,
                    hand_features(
                        states[i], batch["input_ids"], batch["attention_mask"], facts.image_token_id
                    ),
                )
            )
            for i in routers.layers
        }
    n = batch["input_ids"].shape[0]
    return [next((i for i in routers.layers if probs[i][b] > threshold), facts.num_layers) for b in range(n)]


def test_router_features_on_a_hand_computed_example():
    hidden = torch.tensor(
        [
            [[9.0, 9.0], [5.0, 5.0], [1.0, 3.0], [3.0, 1.0], [2.0, -2.0]],  # image at 1; text 2, 3, 4 after
            [
                [0.0, 0.0],
                [7.0, 7.0],
                [1.0, 1.0],
                [2.0, 2.0],
                [4.0, 0.0],
            ],  # pad, text, image at 2 and 3, text 4
            [[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 5.0]],  # pad, pad, no image at all
        ]
    )
    visual = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]).bool()
    real = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]).bool()
    after = after_image(visual, real)
    assert after.tolist() == [
        [False, False, True, True, True],
        [False, False, False, False, True],
        [False, False, False, False, False],
    ]
    feats = router_features(hidden, after)
    # row 0: mean of (1, 3), (3, 1), (2, -2) = (2, 2/3); rms = sqrt((4 + 4/9) / 2) = sqrt(20/9)
    # row 1: mean = (4, 0), rms = sqrt(8); row 2: no text after an image: the last token (0, 5) twice
    eps = 1e-6
    expected = torch.tensor(
        [
            [
                2 / (20 / 9 + eps) ** 0.5,
                (2 / 3) / (20 / 9 + eps) ** 0.5,
                2 / (4 + eps) ** 0.5,
                -2 / (4 + eps) ** 0.5,
            ],
            [4 / (8 + eps) ** 0.5, 0.0, 4 / (8 + eps) ** 0.5, 0.0],
            [0.0, 5 / (12.5 + eps) ** 0.5, 0.0, 5 / (12.5 + eps) ** 0.5],
        ]
    )
    torch.testing.assert_close(feats, expected, rtol=1e-6, atol=1e-7)


def _routers_with_mixed_exits(model, batch, tmp_path):
    """Random routers, and a threshold at which the examples of ``batch`` exit at different layers."""
    facts = arch_facts(model)
    signature = {"model_type": facts.model_type, "num_layers": 4, "hidden_size": facts.hidden_size}
    torch.manual_seed(0)
    routers = skipvlm.DyVTERouters(facts.hidden_size, skipvlm.DyVTEConfig(layers=[1, 2, 3]), signature)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states  # input of layer l at [l]
        feats = [
            hand_features(states[i], batch["input_ids"], batch["attention_mask"], IMAGE_TOKEN)
            for i in (1, 2, 3)
        ]
        probs = torch.stack([torch.sigmoid(routers(i, f)) for i, f in zip((1, 2, 3), feats, strict=True)])

    def exits(threshold: float) -> list[int]:
        return [next((i + 1 for i in range(3) if probs[i, b] > threshold), 4) for b in range(probs.shape[1])]

    threshold = max(sorted(probs.flatten().tolist()), key=lambda t: len(set(exits(t - 1e-6)))) - 1e-6
    routers.save(tmp_path / "routers")
    return threshold, exits(threshold)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen3_vl", "gemma3"])
def test_each_example_exits_at_its_own_layer_and_batches_like_one_by_one(arch, tmp_path):
    model = build_model(arch)
    batch = make_inputs(arch, lengths=(7, 3, 5, 6), seed=6)
    threshold, expected = _routers_with_mixed_exits(model, batch, tmp_path)
    assert len(set(expected)) > 1, "the fixture should make the examples exit at different layers"
    skipvlm.apply_plan(model, skipvlm.Plan(dyvte=str(tmp_path / "routers"), dyvte_threshold=threshold))
    greedy(model, batch, steps=1)
    assert skipvlm.exit_layers(model) == expected

    def exited_alone(b: int) -> None:
        assert skipvlm.exit_layers(model) == [expected[b]]

    assert_batch_equals_rows(model, arch, batch, steps=4, after_row=exited_alone)
    # Threshold 1 never exits: the base model.
    skipvlm.apply_plan(model, skipvlm.Plan(dyvte=str(tmp_path / "routers"), dyvte_threshold=1.0))
    expected_logits = logits(skipvlm.apply_plan(build_model(arch), skipvlm.Plan()), batch)
    torch.testing.assert_close(logits(model, batch), expected_logits, rtol=0, atol=0)


def test_routers_for_another_model_or_a_missing_folder_are_refused(tmp_path):
    model = build_model("llava")
    batch = make_inputs("llava")
    _routers_with_mixed_exits(model, batch, tmp_path)
    with pytest.raises(ValueError, match=r"trained for another model \(num_layers: routers 4 vs model 6\)"):
        skipvlm.apply_plan(build_model("llava", num_layers=6), skipvlm.Plan(dyvte=str(tmp_path / "routers")))
    with pytest.raises(FileNotFoundError, match="no DyVTE routers at"):
        skipvlm.apply_plan(model, skipvlm.Plan(dyvte=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="no attention runs before it"):
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0], dyvte=str(tmp_path / "routers")))
    (tmp_path / "routers" / "dyvte_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a readable DyVTE router folder"):
        skipvlm.DyVTERouters.load(tmp_path / "routers")


# Per candidate layer: (tokens of 100 that agree with the full model's answer, answer-loss with the visual
# tokens removed) of each of 4 examples; the full model's loss is 1.0. Labels by hand: exit iff at least
# 99 of 100 agree and the loss is at most 1.03.
LABEL_CASES = {
    1: ([100, 99, 98, 100], [1.0, 1.0, 1.0, 1.031]),  # exit, exit, keep (98 %), keep (loss)
    2: ([100, 100, 100, 100], [1.03, 1.5, 1.6, 0.5]),  # exit (1.03 is allowed), keep, keep, exit
    3: ([97, 99, 100, 0], [0.9, 1.03, 2.0, 0.1]),  # keep, exit, keep, keep
}
EXITS_BY_HAND = {"1": 2, "2": 2, "3": 1}


def test_labels_follow_the_agreement_and_loss_ratio_rule(monkeypatch):
    """The generated answers and losses are replaced by a table, so the labels are known exactly."""
    import skipvlm.tokens.dyvte as dyvte

    def fake_greedy(model, batch, new_tokens, pad):
        layer = skipvlm.current_plan(model).visual_exit_layer
        tokens = torch.zeros(batch["input_ids"].shape[0], new_tokens, dtype=torch.long)
        if layer is not None:
            for b, agree in enumerate(LABEL_CASES[layer][0]):
                tokens[b, agree:] = 7
        return tokens

    def fake_losses(model, batch):
        layer = skipvlm.current_plan(model).visual_exit_layer
        return torch.tensor(LABEL_CASES[layer][1]) if layer is not None else torch.ones(4)

    monkeypatch.setattr(dyvte, "_greedy", fake_greedy)
    monkeypatch.setattr(dyvte, "_answer_losses", fake_losses)
    model, processor = toy_parts(num_layers=4)
    config = skipvlm.DyVTEConfig(steps=1, batch_size=4, layers_per_batch=3, max_new_tokens=100)
    routers = skipvlm.train_dyvte(model, colour_examples(4), ChatCollator(processor), config, progress=False)
    per_layer = routers.report["exit_labels_per_layer"]
    assert {k: v["exit"] for k, v in per_layer.items()} == EXITS_BY_HAND
    assert all(v["total"] == 4 for v in per_layer.values())
