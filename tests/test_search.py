"""The bandit (METHODS §3): sampling, the update rule, convergence on a known best subset, state."""

from __future__ import annotations

import math

import pytest
import torch

import skipvlm
from skipvlm.search import Candidates, control_plan


def test_update_follows_the_spec_formula():
    b = skipvlm.Bandit(num_arms=4, k=2, beta=10.0, alpha=2.0, seed=0)
    b.preferences = torch.tensor([0.0, 0.1, -0.1, 0.05], dtype=torch.float64)
    pi = torch.softmax(10.0 * b.preferences, 0)
    subsets, losses = [[0, 1], [1, 3]], [0.5, 1.5]
    rewards = b.update(subsets, losses)
    r = [math.exp(-0.5), math.exp(-1.5)]
    assert rewards == pytest.approx(r)
    rbar = sum(r) / 2
    expected = torch.tensor([0.0, 0.1, -0.1, 0.05], dtype=torch.float64)
    for s, rj in zip(subsets, r, strict=True):
        for i in s:
            expected[i] += 2.0 * (rj - rbar) * pi[i] * (1 - pi[i])
    torch.testing.assert_close(b.preferences, expected, rtol=0, atol=1e-12)
    assert b.updates == 1


def test_samples_are_distinct_sorted_k_subsets_and_seeded():
    b = skipvlm.Bandit(num_arms=8, k=3, seed=5)
    subsets = b.sample(n=4)
    assert len(subsets) == 4 and len({tuple(s) for s in subsets}) == 4
    assert all(s == sorted(s) and len(set(s)) == 3 and max(s) < 8 for s in subsets)
    again = skipvlm.Bandit(num_arms=8, k=3, seed=5)
    assert again.sample(n=4) == subsets
    assert skipvlm.Bandit(num_arms=8, k=3, seed=6).sample(n=4) != subsets
    assert len(b.uniform(n=5)) == 5
    with pytest.raises(ValueError, match="only 3 exist"):
        skipvlm.Bandit(num_arms=3, k=2).sample(n=4)


def _synthetic_loss(subset, safe) -> float:
    """Skipping a safe arm costs little, an unsafe one a lot: the best subset is known."""
    return sum(0.05 if i in safe else 1.0 for i in subset) / len(subset)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_bandit_concentrates_on_the_arms_that_are_safe_to_skip(noise):
    safe = {1, 4, 6, 9}
    b = skipvlm.Bandit(num_arms=12, k=4, seed=0, noise=noise)
    for _ in range(300):
        subsets = b.sample(n=3)
        b.update(subsets, [_synthetic_loss(s, safe) for s in subsets])
    assert b.top_k() == sorted(safe)
    assert b.policy()[sorted(safe)].sum() > 0.9


def test_state_round_trips_and_continues_identically():
    b = skipvlm.Bandit(num_arms=6, k=2, seed=3)
    for _ in range(5):
        s = b.sample(3)
        b.update(s, [_synthetic_loss(x, {0, 5}) for x in s])
    clone = skipvlm.Bandit.from_state_dict(b.state_dict())
    torch.testing.assert_close(clone.preferences, b.preferences, rtol=0, atol=0)
    for _ in range(3):
        s1, s2 = b.sample(3), clone.sample(3)
        assert s1 == s2
        b.update(s1, [0.1, 0.2, 0.3])
        clone.update(s2, [0.1, 0.2, 0.3])
    assert clone.state_dict() == b.state_dict()


def test_top_k_breaks_ties_by_lower_index():
    assert skipvlm.Bandit(num_arms=5, k=2).top_k() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_arms": 4, "k": 5}, "k=5 must be between 1 and"), ({"num_arms": 4, "k": 0}, "k=0")],
)
def test_bad_bandit_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skipvlm.Bandit(**kwargs)


def test_update_rejects_bad_input():
    b = skipvlm.Bandit(num_arms=4, k=2)
    with pytest.raises(ValueError, match="one loss per subset"):
        b.update([[0, 1]], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        b.update([[0, 1]], [float("nan")])
    with pytest.raises(ValueError, match="not 2 distinct arms"):
        b.update([[0, 0]], [0.1])


def test_candidate_spaces_map_arms_to_plans():
    attn = Candidates("attention", 4)
    assert attn.plan([3, 1]) == skipvlm.Plan(skip_attention=[1, 3]) and attn.num_arms == 4
    both = Candidates("attention_or_mlp", 4)
    assert both.num_arms == 8
    plan = both.plan([1, 6])
    assert plan == skipvlm.Plan(skip_attention=[1], skip_mlp=[2])
    assert both.arms(plan) == [1, 6] and both.describe(6) == "mlp 2"
    assert Candidates("layer", 4).plan([2]) == skipvlm.Plan(skip_attention=[2], skip_mlp=[2])
    assert Candidates("mlp", 4).plan([0]) == skipvlm.Plan(skip_mlp=[0])
    with pytest.raises(ValueError, match="unknown candidate kind 'heads'"):
        Candidates("heads", 4)


def test_controls():
    attn = Candidates("attention", 8)
    assert control_plan(attn, 3, "last_k") == skipvlm.Plan(skip_attention=[5, 6, 7])
    random_plan = control_plan(attn, 3, "random", seed=1)
    assert len(random_plan.skip_attention) == 3 and random_plan == control_plan(attn, 3, "random", seed=1)
    assert control_plan(Candidates("attention_or_mlp", 4), 2, "last_k") == skipvlm.Plan(skip_attention=[2, 3])
    with pytest.raises(ValueError, match="unknown control"):
        control_plan(attn, 3, "first_k")


def test_a_concentrated_policy_still_gives_distinct_subsets():
    b = skipvlm.Bandit(num_arms=6, k=2, seed=0)
    b.preferences[torch.tensor([0, 1])] = 10.0
    subsets = b.sample(n=3)
    assert subsets[0] == [0, 1] and len({tuple(s) for s in subsets}) == 3
    assert all(0 in s or 1 in s for s in subsets[1:])  # the most probable others swap one arm
    tiny = skipvlm.Bandit(num_arms=3, k=2, seed=0)
    assert sorted(tiny.sample(n=3)) == [[0, 1], [0, 2], [1, 2]]
