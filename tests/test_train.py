"""Search and training loops: outputs, determinism, kill-and-resume, early errors, candidates."""

from __future__ import annotations

import json
import math
import os
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file

import skipvlm
from skipvlm.data import ChatCollator
from skipvlm.train import Interrupted, eas_config_for_plan, fit

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
    train = skipvlm.TrainConfig(**{"lr": 1e-2, "progress": False, **kw.pop("train", {})})
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
    # The plan is the k arms of highest final preference, ties to the lower index (METHODS §3.3).
    final = log["trajectory"][-1]["preferences"]
    assert final == result.bandit.preferences.tolist() and len(set(final)) == 4
    assert result.arms == sorted(sorted(range(4), key=lambda i: (-final[i], i))[:2])


def test_each_sampled_subset_is_scored_under_its_own_plan(monkeypatch):
    """A spy on the model's forward records the plan, mode and batch of every call: the scoring calls (no
    grad, eval mode) run the sampled subsets' plans in order, on the held-out batches in turn."""
    calls = []
    forward = skipvlm.EASModel.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(
            (self.training, torch.is_grad_enabled(), self.plan, kwargs["input_ids"], float(out.loss.detach()))
        )
        return out

    monkeypatch.setattr(skipvlm.EASModel, "forward", spy)
    model, batches, _ = data()
    collate = ChatCollator(toy_parts()[1])
    held_ex = colour_examples(8, seed=1)
    held = [collate(held_ex[:4]), collate(held_ex[4:])]
    result = skipvlm.search(model, batches, held, quick_search())
    scoring = [c for c in calls if not c[1]]
    assert all(not c[0] for c in scoring)  # eval mode
    assert all(c[0] and c[1] for c in calls if c[1])  # training steps: train mode, with grad
    updates = result.trajectory[1:]
    assert len(updates) == 8 and len(scoring) == 8 * 3
    for u, update in enumerate(updates):
        mine = scoring[3 * u : 3 * u + 3]
        assert [c[2] for c in mine] == [skipvlm.Plan(skip_attention=s) for s in update["subsets"]]
        assert all(torch.equal(c[3], held[u % 2]["input_ids"]) for c in mine)
        # each subset's loss is the one its own forward returned; three subsets, three losses
        assert update["losses"] == pytest.approx([c[4] for c in mine], rel=1e-6)
        assert len({tuple(s) for s in update["subsets"]}) == 3 and len(set(update["losses"])) == 3
        # and the preferences moved by METHODS §3's rule, each subset credited with its own reward
        before = torch.tensor(result.trajectory[u]["preferences"], dtype=torch.float64)
        pi = torch.softmax(10.0 * before, 0)
        rewards = [math.exp(-loss) for loss in update["losses"]]
        assert update["rewards"] == pytest.approx(rewards)
        expected = before.clone()
        for subset, r in zip(update["subsets"], rewards, strict=True):
            for i in subset:
                expected[i] += 2.0 * (r - sum(rewards) / 3) * pi[i] * (1 - pi[i])
        assert update["preferences"] == pytest.approx(expected.tolist(), abs=1e-12)
    # a training step runs the subset it drew: warm-up and search steps skip k=2 attentions
    assert all(len(c[2].skip_attention) == 2 for c in calls if c[1])


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
        ({"interval": 9}, r"interval=9 is larger than the search phase \(8 micro-batches"),
    ],
)
def test_search_fails_early_on_impossible_settings(kwargs, message):
    model, batches, held = data()
    with pytest.raises(ValueError, match=message):
        skipvlm.search(model, batches, held, quick_search(**kwargs))


@pytest.mark.parametrize(
    ("grad_accum", "interval", "update_steps"),
    [
        (1, 4, [12, 16, 20, 24]),  # 8 steps per epoch; the search phase is steps 9..24
        (4, 4, [3, 4, 5, 6]),  # once per optimiser step (4 micro-batches each)
        (4, 2, [3, 3, 4, 4, 5, 5, 6, 6]),  # twice per step
        (4, 8, [4, 6]),  # every other step
        (3, 4, [5, 6, 8, 9]),  # groups of 3, 3, 2 micro-batches: updates where a multiple of 4 is crossed
    ],
)
def test_bandit_interval_counts_micro_batches(grad_accum, interval, update_steps):
    """``interval`` counts micro-batches as the official code does, so gradient accumulation does not make
    the bandit update less often (8 micro-batches per epoch, 1 warm-up and 2 search epochs)."""
    model, batches, held = data(batch_size=2)
    config = quick_search(interval=interval, train={"grad_accum": grad_accum})
    result = skipvlm.search(model, batches, held, config)
    assert [t["step"] for t in result.trajectory[1:]] == update_steps
    assert result.bandit.updates == len(update_steps)


def test_search_killed_between_bandit_updates_resumes_with_accumulation(tmp_path):
    """With grad_accum=3 (steps of 3, 3, 2 micro-batches) the update cadence is a function of the step, so a
    search resumed from a mid-search checkpoint updates the bandit at the same steps as an unbroken one."""
    config = quick_search(interval=2, train={"grad_accum": 3, "checkpoint_every": 2})
    model, batches, held = data(batch_size=2)
    full = skipvlm.search(model, batches, held, config)
    assert [t["step"] for t in full.trajectory[1:]] == [4, 5, 5, 6, 7, 8, 8, 9]

    def kill_at_7(event):
        if event["step"] == 7:
            raise Killed

    model, batches, held = data(batch_size=2)
    with pytest.raises(Killed):
        skipvlm.search(model, batches, held, config, out=tmp_path, callback=kill_at_7)
    assert json.loads((tmp_path / "search_checkpoint" / "state.json").read_text())["step"] == 6
    model, batches, held = data(batch_size=2)
    resumed = skipvlm.search(model, batches, held, config, out=tmp_path, resume=True)
    assert [t["step"] for t in resumed.trajectory[1:]] == [t["step"] for t in full.trajectory[1:]]
    assert resumed.bandit.state_dict() == full.bandit.state_dict()
    assert_same_adapters(adapters_of(resumed.model), adapters_of(full.model))


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


def test_train_lowers_the_loss_calibrates_and_saves(tmp_path, monkeypatch):
    applied = []  # the learning rate of every optimiser step, as the optimiser sees it
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    model, batches, _ = data()
    with torch.no_grad():
        before = sum(model(**b).loss for b in batches) / len(batches)
    eas = skipvlm.EASConfig(skip_attention=[1, 2])
    trained = skipvlm.train(
        model,
        batches,
        skipvlm.TrainConfig(epochs=4, lr=1e-2, grad_accum=2, warmup_ratio=0.25, progress=False),
        eas=eas,
        out=tmp_path,
    )
    with torch.no_grad():
        after = sum(trained(**b).loss for b in batches) / len(batches)
    assert after < 0.97 * before
    assert int(trained.adapters.replace["1"].calib_n) == 16
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert len(log["history"]) == 4 * 2  # 4 batches / grad_accum 2 = 2 steps per epoch
    # 8 steps, 2 of linear warm-up to 1e-2, then cosine decay over the other 6 (by hand)
    lr = [5e-3, 1e-2] + [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert [h["lr"] for h in log["history"]] == pytest.approx(lr, rel=1e-12)
    assert applied == pytest.approx(lr, rel=1e-12)
    assert [h["step"] for h in log["history"]] == list(range(1, 9))
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


def test_activation_checkpointing_recomputes_every_layer_and_changes_nothing(monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    results, counts = [], []
    for checkpointing in (False, True):
        calls.clear()
        model, batches, _ = data()
        config = skipvlm.TrainConfig(
            epochs=1, gradient_checkpointing=checkpointing, progress=False, calibrate=False
        )
        results.append(
            adapters_of(skipvlm.train(model, batches, config, eas=skipvlm.EASConfig(skip_attention=[1])))
        )
        counts.append(len(calls))
    assert counts == [0, 4 * 4]  # 4 training batches x 4 decoder layers, each run under checkpoint()
    moved = max(
        (results[0][k].float() - adapters_of(fresh_eas(skip=[1]))[k].float()).abs().max() for k in results[0]
    )
    assert moved > 1e-4  # training moved the adapters, so equality below is not vacuous
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=0, atol=1e-6)


def fresh_eas(skip):
    return skipvlm.get_eas_model(toy_parts()[0], skipvlm.EASConfig(skip_attention=list(skip)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_sets_the_autocast_of_every_training_forward(monkeypatch, precision):
    modes = []
    forward = skipvlm.EASModel.forward

    def spy(self, *args, **kwargs):
        modes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(skipvlm.EASModel, "forward", spy)
    losses = []
    model, batches, _ = data()
    config = skipvlm.TrainConfig(
        epochs=1, precision=precision, shuffle=False, progress=False, calibrate=False
    )
    skipvlm.train(model, batches, config, eas=skipvlm.EASConfig(skip_attention=[1]), callback=losses.append)
    expected = (True, torch.bfloat16) if precision == "bf16" else (False, modes[0][1])
    assert modes == [expected] * 4
    # The first step's loss is that of the same untrained model: bf16 differs from fp32, a little.
    model, batches, _ = data()
    with torch.no_grad():
        fp32 = float(fresh_eas(skip=[1])(**batches[0]).loss)
    first = losses[0]["loss"]
    if precision == "fp32":
        assert first == pytest.approx(fp32, rel=1e-6)
    else:
        assert 1e-6 < abs(first - fp32) < 0.02 * fp32


# --- the loop fit and search share ------------------------------------------------------------------------


def fit_projector(out=None, lr=1e-2, **kw) -> dict[str, torch.Tensor]:
    """fit on a plain model (no trainable_state_dict): its projector trains, 3 epochs x 4 steps."""
    model, batches, _ = data()
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name)
    config = skipvlm.TrainConfig(epochs=3, lr=lr, checkpoint_every=2, progress=False)
    fit(model, batches, config, out=out, **kw)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def search_supernet(out=None, lr=1e-2, **kw) -> dict[str, torch.Tensor]:
    """search, 1 warm-up + 2 search epochs x 4 steps: the supernet's adapters and the bandit."""
    model, batches, held = data()
    result = skipvlm.search(
        model, batches, held, quick_search(train={"checkpoint_every": 2, "lr": lr}), out=out, **kw
    )
    return adapters_of(result.model) | {"preferences": result.bandit.preferences}


@pytest.mark.parametrize("run", [fit_projector, search_supernet], ids=["fit", "search"])
def test_fit_and_search_checkpoint_stop_and_resume_alike(tmp_path, run):
    """Both run one loop: checkpoints every 2 steps, Ctrl-C saves at the step it finishes, a resumed run
    ends where an uninterrupted one does, bit for bit, and other settings are refused."""
    full = run()
    name = "fit" if run is fit_projector else "search"
    state = tmp_path / f"{name}_checkpoint" / "state.json"
    saved = []

    def ctrl_c_at_5(event):
        if state.is_file():
            saved.append(json.loads(state.read_text())["step"])
        if event["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=r"step 5 of 12; checkpoint saved in .*resume"):
        run(tmp_path, callback=ctrl_c_at_5)
    assert sorted(set(saved)) == [2, 4]
    meta = json.loads(state.read_text())
    assert meta["step"] == 5
    assert {"world", "data"} <= meta["extra"]["identity"].keys() and meta["extra"]["identity"]["world"] == 1
    tensors = load_file(str(state.parent / "state.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"model", "optim", "rng"}
    with pytest.raises(ValueError, match=r"belongs to a run with other settings \(.*lr: 0\.01 -> 0\.02"):
        run(tmp_path, lr=2e-2, resume=True)
    resumed = run(tmp_path, resume=True)
    assert_same_adapters(resumed, full)


def test_fit_checkpoints_every_trainable_parameter_of_a_plain_model(tmp_path):
    model, batches, _ = data()
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name)
    fit(model, batches, skipvlm.TrainConfig(epochs=1, progress=False), out=tmp_path)
    tensors = load_file(str(tmp_path / "fit_checkpoint" / "state.safetensors"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 4
    assert {k.removeprefix("model.") for k in tensors if k.startswith("model.")} == trained


@pytest.mark.parametrize("wrapper", ["plain", "peft"])
def test_activation_checkpointing_reaches_the_layers_inside_any_wrapper(monkeypatch, wrapper):
    """fit finds the transformers model of a plain or PEFT model (EASModel: see the test above): with
    gradient_checkpointing every decoder MLP runs again in the backward pass, and nothing else changes."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaMLP  # the toy's text model is a Llama

    calls = []
    forward = LlamaMLP.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counting)
    counts, results = [], []
    for checkpointing in (False, True):
        calls.clear()
        torch.manual_seed(0)
        model, batches, _ = data()
        if wrapper == "peft":
            with warnings.catch_warnings():  # peft asks transformers a deprecated question
                warnings.simplefilter("ignore", FutureWarning)
                model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        else:
            for name, p in model.named_parameters():
                p.requires_grad_("language_model" in name)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        config = skipvlm.TrainConfig(epochs=1, gradient_checkpointing=checkpointing, progress=False)
        fit(model, batches[:2], config)
        counts.append(len(calls))
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert counts == [2 * 4, 2 * 2 * 4]  # 2 batches x 4 layers, then again in the backward pass
    moved = max(float((results[0][k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4  # training moved the weights, so equality below is not vacuous
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=0, atol=1e-6)


def test_search_over_mlps_replaced_by_ffn_pias_and_train_the_found_plan():
    model, batches, held = data()
    eas = skipvlm.EASConfig(mlp_replace="pia")
    result = skipvlm.search(model, batches, held, quick_search(candidates="mlp"), eas=eas)
    assert len(result.model.adapters.ffn) == 4  # the supernet: an FFN-PIA in every layer
    cfg = result.eas_config(eas)
    assert cfg.mlp_replace == "pia" and cfg.skip_mlp == result.arms and not cfg.supernet
    fresh, _, _ = data()
    trained = skipvlm.train(fresh, batches, skipvlm.TrainConfig(epochs=1, progress=False), eas=cfg)
    assert sorted(trained.adapters.ffn) == [str(i) for i in result.arms]


def test_param_groups_train_at_their_lr_scale():
    """A model's ``optimizer_parameters()`` may give param groups with an ``lr_scale``: AdamW's first
    step moves every weight by about its group's learning rate."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return type("Out", (), {"loss": ((self.head(self.body(x)) - labels) ** 2).mean()})()

        def optimizer_parameters(self):
            return [{"params": self.body.parameters(), "lr_scale": 0.1}, {"params": self.head.parameters()}]

    torch.manual_seed(0)
    model = Two()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"x": torch.randn(8, 4), "labels": torch.randn(8, 1)}
    fit(model, [batch], skipvlm.TrainConfig(epochs=1, lr=1e-2, max_grad_norm=0, progress=False))
    moved = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    torch.testing.assert_close(
        moved["head.weight"], torch.full_like(moved["head.weight"], 1e-2), rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        moved["body.weight"], torch.full_like(moved["body.weight"], 1e-3), rtol=1e-3, atol=0
    )
