"""The k-armed bandit of the redundancy search and the candidate spaces it searches (METHODS.md §3).

:class:`Bandit` is a pure, seeded object: no I/O and no torch.distributed. Every rank of a
multi-process run builds the same bandit from the same seed and feeds it the same (all-reduced)
losses, so all ranks draw the same subsets and keep the same preferences.

Arms are candidate modules; a high preference means *safe to skip*. The policy is
``pi = softmax(beta * H)``; after scoring subsets ``S_j`` with held-out losses ``l_j``, rewards are
``r_j = exp(-l_j)``, the baseline is ``rbar = mean_j r_j``, and every arm ``i`` in ``S_j`` moves by
``alpha * (r_j - rbar) * pi_i * (1 - pi_i)``.

:class:`Candidates` maps arms to plans for each candidate kind: ``attention`` (EAS), ``mlp``,
``attention_or_mlp`` (ablations) and ``layer`` (DAS), plus the ``random`` and ``last_k`` controls.
"""

from __future__ import annotations

import itertools
import math
import random as _random
from dataclasses import dataclass
from typing import Any

import torch

from skipvlm.plan import CANDIDATE_KINDS, Plan

__all__ = ["CANDIDATE_KINDS", "Bandit", "Candidates", "control_plan"]


class Bandit:
    """Gradient bandit over ``num_arms`` arms that picks ``k`` of them (METHODS §3).

    Args:
        num_arms: number of candidate modules.
        k: how many arms a subset holds (how many modules are skipped).
        beta: inverse temperature of the policy ``softmax(beta * H)``.
        alpha: step size of the preference update.
        seed: seed of the bandit's own random generator (sampling is deterministic for a seed).
        noise: exploration noise eps; when > 0, :meth:`sample` ranks arms by ``H + u``,
            ``u ~ U(0, eps)``, instead of drawing them from the policy.

    Raises:
        ValueError: ``k`` is not in ``1..num_arms`` or a rate is out of range.
    """

    def __init__(
        self, num_arms: int, k: int, beta: float = 10.0, alpha: float = 2.0, seed: int = 0, noise: float = 0.0
    ):
        if num_arms < 1:
            raise ValueError(f"the bandit needs at least one arm, got num_arms={num_arms}")
        if not 1 <= k <= num_arms:
            raise ValueError(f"k={k} must be between 1 and the number of candidate modules ({num_arms})")
        if beta <= 0 or alpha <= 0 or noise < 0:
            raise ValueError(f"beta and alpha must be > 0 and noise >= 0, got {beta}, {alpha}, {noise}")
        self.num_arms, self.k, self.beta, self.alpha, self.noise, self.seed = (
            num_arms,
            k,
            beta,
            alpha,
            noise,
            seed,
        )
        self.preferences = torch.zeros(num_arms, dtype=torch.float64)
        self.updates = 0
        self._gen = torch.Generator().manual_seed(seed)

    # --- policy and sampling -------------------------------------------------------------------

    def policy(self) -> torch.Tensor:
        """``pi = softmax(beta * H)`` over the arms, (num_arms,) float64."""
        return torch.softmax(self.beta * self.preferences, dim=0)

    def _max_subsets(self) -> int:
        return math.comb(self.num_arms, self.k)

    def _distinct(self, n: int, draw) -> list[list[int]]:
        """``n`` distinct subsets from ``draw``; when the policy is so concentrated that fresh draws keep
        repeating, the rest are the most probable subsets not drawn yet (one arm swapped)."""
        if n > self._max_subsets():
            raise ValueError(f"asked for {n} distinct subsets, but only {self._max_subsets()} exist")
        out: list[list[int]] = []
        misses = 0
        while len(out) < n:
            subset = sorted(int(i) for i in draw())
            if subset not in out:
                out.append(subset)
                misses = 0
            else:
                misses += 1
                if misses >= 50:
                    out.append(self._most_probable_neighbour(out))
        return out

    def _most_probable_neighbour(self, taken: list[list[int]]) -> list[int]:
        log_pi = torch.log_softmax(self.beta * self.preferences, dim=0)
        best, best_score = None, -math.inf
        for subset in taken:
            outside = [i for i in range(self.num_arms) if i not in subset]
            for drop in subset:
                for add in outside:
                    cand = sorted([*(i for i in subset if i != drop), add])
                    score = float(log_pi[cand].sum())
                    if cand not in taken and score > best_score:
                        best, best_score = cand, score
        if best is None:  # every neighbour is taken: the first subset in order that is not
            best = next(
                list(c) for c in itertools.combinations(range(self.num_arms), self.k) if list(c) not in taken
            )
        return best

    def sample(self, n: int = 1) -> list[list[int]]:
        """``n`` distinct sorted k-subsets, each drawn from the policy without replacement."""
        if self.noise > 0:

            def draw() -> torch.Tensor:
                u = torch.rand(self.num_arms, generator=self._gen, dtype=torch.float64) * self.noise
                return torch.topk(self.preferences + u, self.k).indices

        else:
            pi = self.policy()

            def draw() -> torch.Tensor:
                return torch.multinomial(pi, self.k, replacement=False, generator=self._gen)

        return self._distinct(n, draw)

    def uniform(self, n: int = 1) -> list[list[int]]:
        """``n`` distinct sorted k-subsets drawn uniformly (the warm-up sampler)."""
        return self._distinct(n, lambda: torch.randperm(self.num_arms, generator=self._gen)[: self.k])

    # --- learning ------------------------------------------------------------------------------

    def update(self, subsets: list[list[int]], losses: list[float]) -> list[float]:
        """Move the preferences after scoring ``subsets`` with held-out ``losses``; returns the rewards.

        Raises:
            ValueError: the lists differ in length, a subset is malformed, or a loss is not finite.
        """
        if len(subsets) != len(losses) or not subsets:
            raise ValueError(
                f"update needs one loss per subset, got {len(subsets)} subsets, {len(losses)} losses"
            )
        for s in subsets:
            if len(set(s)) != self.k or not all(0 <= i < self.num_arms for i in s):
                raise ValueError(f"subset {s} is not {self.k} distinct arms in 0..{self.num_arms - 1}")
        if not all(math.isfinite(float(x)) for x in losses):
            raise ValueError(f"losses must be finite to score subsets, got {list(losses)}")
        rewards = [math.exp(-float(x)) for x in losses]
        baseline = sum(rewards) / len(rewards)
        pi = self.policy()
        step = torch.zeros_like(self.preferences)
        for subset, r in zip(subsets, rewards, strict=True):
            idx = torch.tensor(subset)
            step[idx] += self.alpha * (r - baseline) * pi[idx] * (1 - pi[idx])
        self.preferences += step
        self.updates += 1
        return rewards

    def top_k(self) -> list[int]:
        """The k arms with the highest preference, sorted; ties go to the lower index."""
        order = sorted(range(self.num_arms), key=lambda i: (-float(self.preferences[i]), i))
        return sorted(order[: self.k])

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this bandit is (JSON-ready)."""
        return {
            "num_arms": self.num_arms,
            "k": self.k,
            "beta": self.beta,
            "alpha": self.alpha,
            "noise": self.noise,
            "seed": self.seed,
            "preferences": self.preferences.tolist(),
            "updates": self.updates,
            "generator": self._gen.get_state().tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Bandit:
        """Rebuild a bandit from :meth:`state_dict` output."""
        b = cls(state["num_arms"], state["k"], state["beta"], state["alpha"], state["seed"], state["noise"])
        b.preferences = torch.tensor(state["preferences"], dtype=torch.float64)
        b.updates = int(state["updates"])
        b._gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        return b


# --- candidate spaces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """The arms of one candidate kind on a model with ``num_layers`` layers, and the plan of a subset.

    * ``attention``: arm i = attention of layer i (EAS).
    * ``mlp``: arm i = MLP of layer i.
    * ``attention_or_mlp``: arms 0..L-1 are attentions, L..2L-1 are MLPs.
    * ``layer``: arm i = the whole layer i (DAS; the layer becomes ``h + A(N_in(h))``).
    """

    kind: str
    num_layers: int

    def __post_init__(self) -> None:
        if self.kind not in CANDIDATE_KINDS:
            raise ValueError(f"unknown candidate kind {self.kind!r}; choose one of {CANDIDATE_KINDS}")

    @property
    def num_arms(self) -> int:
        return 2 * self.num_layers if self.kind == "attention_or_mlp" else self.num_layers

    def plan(self, arms: list[int]) -> Plan:
        """The skip plan that skips ``arms``."""
        arms = sorted(arms)
        if self.kind == "attention":
            return Plan(skip_attention=arms)
        if self.kind == "mlp":
            return Plan(skip_mlp=arms)
        if self.kind == "layer":
            return Plan(skip_attention=arms, skip_mlp=arms)
        n = self.num_layers
        return Plan(skip_attention=[a for a in arms if a < n], skip_mlp=[a - n for a in arms if a >= n])

    def arms(self, plan: Plan) -> list[int]:
        """The arms a plan of this kind skips (the inverse of :meth:`plan`)."""
        if self.kind == "attention":
            return list(plan.skip_attention)
        if self.kind in ("mlp", "layer"):
            return list(plan.skip_mlp)
        return list(plan.skip_attention) + [self.num_layers + i for i in plan.skip_mlp]

    def describe(self, arm: int) -> str:
        """A readable arm name, e.g. ``attn 3`` or ``mlp 5``."""
        if self.kind == "attention_or_mlp":
            return f"attn {arm}" if arm < self.num_layers else f"mlp {arm - self.num_layers}"
        short = {"attention": "attn", "mlp": "mlp", "layer": "layer"}[self.kind]
        return f"{short} {arm}"


def control_plan(candidates: Candidates, k: int, control: str, seed: int = 0) -> Plan:
    """A control plan of the same size as a searched one.

    Args:
        candidates: the candidate space.
        k: number of arms to skip.
        control: ``"random"`` (k arms uniformly at random, seeded) or ``"last_k"`` (the last k arms;
            for ``attention_or_mlp`` the last k attentions).
        seed: seed of the random control.
    """
    if not 1 <= k <= candidates.num_arms:
        raise ValueError(f"k={k} must be between 1 and the number of candidates ({candidates.num_arms})")
    if control == "random":
        rng = _random.Random(f"random-control-{seed}")
        return candidates.plan(sorted(rng.sample(range(candidates.num_arms), k)))
    if control == "last_k":
        n = candidates.num_layers if candidates.kind == "attention_or_mlp" else candidates.num_arms
        if k > n:
            raise ValueError(f"last_k needs k <= {n} for {candidates.kind!r}, got {k}")
        return candidates.plan(list(range(n - k, n)))
    raise ValueError(f"unknown control {control!r}; use 'random' or 'last_k'")
