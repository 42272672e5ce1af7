"""A token-exit method and a host family plug in from their own code: no edit of the runtime, the plan,
the cost model or the CLI (issue 14). Both are registered here, by a test, and removed afterwards."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm import arch, plan
from skipvlm.arch import HostFamily, register_host
from skipvlm.cost import count_macs
from skipvlm.plan import PlanField, TokenExitMethod, exit_layer_value, register_token_exit
from skipvlm.tokens.exit import ExitRunner

from conftest import VOCAB, build_model, logits, make_inputs, text_config_kwargs, zero_out


class _WithdrawAll:
    """The policy of the test's method: every visual token leaves before ``layer`` (VTW's rule)."""

    def __init__(self, layer: int):
        self.layer = layer

    def keep(self, i, run, hidden):
        return ~run.visual if i == self.layer else None

    def watch(self, i, layer):
        return contextlib.nullcontext()


@pytest.fixture
def fourth_method():
    method = TokenExitMethod(
        name="withdraw",
        fields=(PlanField("withdraw_layer", None, exit_layer_value, "test: withdraw at", int, layer=True),),
        runner=lambda p, facts: ExitRunner(lambda device: _WithdrawAll(p.withdraw_layer), facts),
        exit_layer=lambda p: p.withdraw_layer,
        macs=lambda p, visual, measured: (p.withdraw_layer, visual),
    )
    register_token_exit(method)
    yield method
    del plan._METHODS[method.name]


def test_a_fourth_token_exit_method_runs_through_the_plan_runtime_cost_and_cli(fourth_method, capsys):
    model = build_model("llava")
    inputs = make_inputs("llava", lengths=(40, 30))
    mine = skipvlm.Plan(skip_attention=[3], withdraw_layer=2)
    assert mine.token_exit is fourth_method and mine == skipvlm.Plan.from_dict(mine.to_dict())
    with pytest.raises(ValueError, match="one visual-token exit method at a time"):
        skipvlm.Plan(withdraw_layer=2, visual_exit_layer=2)
    with pytest.raises(ValueError, match="decoder layers"):
        skipvlm.apply_plan(model, skipvlm.Plan(withdraw_layer=9))
    vtw = skipvlm.Plan(skip_attention=[3], visual_exit_layer=2)
    skipvlm.apply_plan(model, vtw)
    expected = logits(model, inputs)
    skipvlm.apply_plan(model, mine)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert skipvlm.exit_layers(model) == [2, 2]
    assert count_macs(model, 600, mine).total == count_macs(model, 600, vtw).total
    from skipvlm.cli import build_parser, main

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--withdraw-layer", "2"])
    assert args.withdraw_layer == 2
    assert main(["cost", "--preset", "llava-1.5-7b", "--prompt-tokens", "749", "--withdraw-layer", "16"]) == 0
    vtw = capsys.readouterr().out
    assert (
        main(["cost", "--preset", "llava-1.5-7b", "--prompt-tokens", "749", "--visual-exit-layer", "16"]) == 0
    )
    assert capsys.readouterr().out == vtw.replace("withdraw_layer", "visual_exit_layer")


@pytest.fixture
def qwen3_host():
    """Qwen3 registered afresh by the test (hosts.py registers it too: put that entry back after)."""
    import skipvlm.hosts  # noqa: F401  (the built-in entries, so the one popped here is restored)

    built_in = arch._HOSTS.pop("qwen3", None)
    family = register_host(HostFamily("qwen3", "Qwen3ForCausalLM"))
    yield family
    del arch._HOSTS["qwen3"]
    if built_in is not None:
        arch._HOSTS["qwen3"] = built_in


def test_a_new_host_family_is_one_entry(qwen3_host):
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**text_config_kwargs(head_dim=8))).eval()
    assert skipvlm.arch_facts(model).family is qwen3_host
    ids = torch.randint(3, VOCAB, (2, 9))
    reference = zero_out(model, 1, "attention")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1], skip_mlp=[2]))
        skipped_mlp = zero_out(reference, 2, "mlp")(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, skipped_mlp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, skipped_mlp)
    eas = skipvlm.get_eas_model(model, skipvlm.EASConfig(skip_attention=[1]))
    with torch.no_grad():
        torch.testing.assert_close(eas(input_ids=ids).logits.shape, expected.shape)


def test_plans_built_before_a_method_registers_still_compare_validate_and_read(fourth_method):
    del plan._METHODS[fourth_method.name]
    before = skipvlm.Plan(skip_attention=[1], visual_exit_layer=2)
    register_token_exit(fourth_method)
    after = skipvlm.Plan(skip_attention=[1], visual_exit_layer=2)
    assert before == after and hash(before) == hash(after)
    assert before.withdraw_layer is None
    before.validate_for(4)
    assert skipvlm.Plan.from_dict(before.to_dict()) == before


def test_the_supported_families_are_listed_right_after_import():
    import subprocess
    import sys

    code = "import skipvlm as s; print('llama' in s.SUPPORTED_MODEL_TYPES, len(s.SUPPORTED_MODEL_TYPES) > 6)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_a_model_under_token_exit_copies():
    import copy

    model = build_model("llava")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[3], visual_exit_layer=2))
    inputs = make_inputs("llava", lengths=(30, 20))
    expected = logits(model, inputs)
    twin = copy.deepcopy(model)  # the token-exit runner (closures) is rebuilt from the plan
    torch.testing.assert_close(logits(twin, inputs), expected, rtol=0, atol=0)
    assert skipvlm.exit_layers(twin) == [2, 2]
