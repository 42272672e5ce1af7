"""Search and training loops: outputs, determinism, kill-and-resume, early errors, candidates."""

from __future__ import annotations

import json

import pytest
import torch

import skipvlm
from skipvlm.data import ChatCollator
from skipvlm.train import eas_config_for_plan

from conftest import colour_examples, toy_parts


class Killed(Exception):
    pass


def data(batch_size: int = 4):
    model, processor = toy_parts()
    collate = ChatCollator(processor)
    train_ex, held_ex = colour_examples(16, seed=0), colour_examples(8, seed=1)
    batches = [collate(train_ex[i : i + batch_size]) for i in range(0, len(train_ex), batch_size)]
    return model, batches, [collate(held_ex)]


def quick_search(**kw) -> skipvlm.SearchConfig:
    train = skipvlm.TrainConfig(lr=1e-2, progress=False, **kw.pop("train", {}))
    settings = {"k": 2, "warmup_epochs": 1, "search_epochs": 2, "interval": 1, **kw}
    return skipvlm.SearchConfig(train=train, **settings)


def adapters_of(model: skipvlm.EASModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# --- search ----------------------------------------------------------------------------------------------


def test_search_writes_plan_log_and_plot(tmp_path):
    model, batches, held = data()
    result = skipvlm.search(model, batches, held, quick_search(), out=tmp_path)
    assert len(result.arms) == 2 and result.plan == skipvlm.Plan(skip_attention=result.arms)
    assert result.model.plan == result.plan
    assert skipvlm.Plan.load(tmp_path / "plan.json") == result.plan
    log = json.loads((tmp_path / "search_log.json").read_text())
    assert len(log["trajectory"]) == 1 + 8  # initial + one bandit update per search step (2 epochs x 4)
    assert log["arms"] == result.arms and log["arm_names"] == ["attn 0", "attn 1", "attn 2", "attn 3"]
    assert all(len(t["subsets"]) == 3 for t in log["trajectory"][1:])
    assert (tmp_path / "preferences.png").read_bytes()[:4] == b"\x89PNG"
    assert result.bandit.top_k() == result.arms


def test_search_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        model, batches, held = data()
        r = skipvlm.search(model, batches, held, quick_search())
        runs.append((r.bandit.state_dict(), adapters_of(r.model)))
    assert runs[0][0] == runs[1][0]
    assert_same_adapters(runs[0][1], runs[1][1])


def test_killed_search_resumes_to_the_same_result(tmp_path):
    model, batches, held = data()
    config = quick_search(train={"checkpoint_every": 2})
    full = skipvlm.search(model, batches, held, config)

    def kill_at_7(event):
        if event["step"] == 7:
            raise Killed

    model, batches, held = data()
    with pytest.raises(Killed):
        skipvlm.search(model, batches, held, config, out=tmp_path, callback=kill_at_7)
    assert json.loads((tmp_path / "search_checkpoint" / "state.json").read_text())["step"] == 6
    model, batches, held = data()
    resumed = skipvlm.search(model, batches, held, config, out=tmp_path, resume=True)
    assert resumed.bandit.state_dict() == full.bandit.state_dict()
    assert resumed.plan == full.plan
    assert_same_adapters(adapters_of(resumed.model), adapters_of(full.model))


def test_resuming_with_other_settings_is_refused(tmp_path):
    model, batches, held = data()
    skipvlm.search(model, batches, held, quick_search(), out=tmp_path)
    model, batches, held = data()
    with pytest.raises(ValueError, match="belongs to a run with other settings"):
        skipvlm.search(model, batches, held, quick_search(n_candidates=2), out=tmp_path, resume=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 5}, r"k=5 is larger than the 4 'attention' candidates"),
        ({"interval": 9}, r"interval=9 is larger than the search phase \(8 steps"),
    ],
)
def test_search_fails_early_on_impossible_settings(kwargs, message):
    model, batches, held = data()
    with pytest.raises(ValueError, match=message):
        skipvlm.search(model, batches, held, quick_search(**kwargs))


def test_search_needs_held_out_data():
    model, batches, _ = data()
    with pytest.raises(ValueError, match="held-out"):
        skipvlm.search(model, batches, [], quick_search())


@pytest.mark.parametrize("kind", ["mlp", "attention_or_mlp", "layer"])
def test_search_over_other_candidates(kind):
    model, batches, held = data()
    result = skipvlm.search(model, batches, held, quick_search(candidates=kind))
    cfg = result.eas_config()
    assert cfg.plan() == result.plan and not cfg.supernet
    if kind == "layer":
        assert cfg.skip_layers == result.arms


# --- train ---------------------------------------------------------------------------------------------


def test_train_lowers_the_loss_calibrates_and_saves(tmp_path):
    model, batches, _ = data()
    with torch.no_grad():
        before = sum(model(**b).loss for b in batches) / len(batches)
    eas = skipvlm.EASConfig(skip_attention=[1, 2])
    trained = skipvlm.train(
        model,
        batches,
        skipvlm.TrainConfig(epochs=4, lr=1e-2, grad_accum=2, progress=False),
        eas=eas,
        out=tmp_path,
    )
    with torch.no_grad():
        after = sum(trained(**b).loss for b in batches) / len(batches)
    assert after < 0.97 * before
    assert int(trained.adapters.replace["1"].calib_n) == 16
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert len(log["history"]) == 4 * 2  # 4 batches / grad_accum 2 = 2 steps per epoch
    assert log["history"][0]["lr"] < log["history"][1]["lr"] or log["history"][1]["lr"] <= 1e-2
    loaded = skipvlm.EASModel.from_pretrained(toy_parts()[0], tmp_path / "adapters")
    assert_same_adapters(adapters_of(loaded), adapters_of(trained))
    trained.merge_and_unload("static")  # calibrated, so the static merge works


def test_killed_training_resumes_to_the_same_adapters(tmp_path):
    config = skipvlm.TrainConfig(epochs=3, lr=1e-2, checkpoint_every=3, progress=False, calibrate=False)
    eas = skipvlm.EASConfig(skip_attention=[2], dropout=0.1)  # dropout: the random state must resume too
    model, batches, _ = data()
    full = adapters_of(skipvlm.train(model, batches, config, eas=eas))

    def kill(event):
        if event["step"] == 8:
            raise Killed

    model, batches, _ = data()
    with pytest.raises(Killed):
        skipvlm.train(model, batches, config, eas=eas, out=tmp_path, callback=kill)
    model, batches, _ = data()
    resumed = skipvlm.train(model, batches, config, eas=eas, out=tmp_path, resume=True)
    assert_same_adapters(adapters_of(resumed), full)


def test_continuing_the_supernet_with_the_found_plan():
    model, batches, held = data()
    result = skipvlm.search(model, batches, held, quick_search())
    trained = skipvlm.train(result.model, batches, skipvlm.TrainConfig(epochs=1, progress=False))
    assert trained is result.model and trained.plan == result.plan


def test_config_validation():
    with pytest.raises(ValueError, match="precision must be one of"):
        skipvlm.TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
        skipvlm.TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="unknown candidate kind"):
        skipvlm.SearchConfig(candidates="heads")
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        model, batches, _ = data()
        skipvlm.train(model, batches, skipvlm.TrainConfig(precision="fp16", progress=False))


def test_eas_config_for_plan_maps_each_kind():
    plan = skipvlm.Plan(skip_attention=[1, 2], skip_mlp=[2])
    cfg = eas_config_for_plan(plan, "attention_or_mlp")
    assert cfg.skip_attention == [1, 2] and cfg.skip_mlp == [2] and cfg.skip_layers == []
    das = eas_config_for_plan(skipvlm.Plan(skip_attention=[3], skip_mlp=[3]), "layer")
    assert das.skip_layers == [3] and das.plan() == skipvlm.Plan(skip_attention=[3], skip_mlp=[3])


def test_activation_checkpointing_and_bf16_autocast_options():
    results = []
    for checkpointing in (False, True):
        model, batches, _ = data()
        config = skipvlm.TrainConfig(
            epochs=1, gradient_checkpointing=checkpointing, progress=False, calibrate=False
        )
        results.append(
            adapters_of(skipvlm.train(model, batches, config, eas=skipvlm.EASConfig(skip_attention=[1])))
        )
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=0, atol=1e-6)
    model, batches, _ = data()
    config = skipvlm.TrainConfig(epochs=1, precision="bf16", progress=False, calibrate=False)
    trained = skipvlm.train(model, batches, config, eas=skipvlm.EASConfig(skip_attention=[1]))
    assert all(torch.isfinite(v).all() for v in adapters_of(trained).values())
