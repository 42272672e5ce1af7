"""A thin lmms-eval model class, so any skipvlm model (any plan, merged or not) runs lmms-eval tasks.

lmms-eval is optional; importing this module without it raises a clear ImportError. With it
installed, ``import skipvlm.lmms_eval`` registers the model under the name ``skipvlm``::

    python -m lmms_eval --model skipvlm \\
        --model_args pretrained=runs/x/merged \\
        --tasks scienceqa_img --batch_size 1
    # unmerged adapters on a base: --model_args pretrained=BASE,adapters=runs/x/adapters,merge=static
    # a plain skip plan:           --model_args pretrained=BASE,skip_attention=3-5-7

(lmms-eval only knows models it has imported: run it through a script that imports
``skipvlm.lmms_eval`` first, e.g.
``python -c "import skipvlm.lmms_eval, lmms_eval.__main__ as m; m.cli_evaluate()" --model skipvlm ...``.)
Only ``generate_until`` is implemented (the generation tasks); log-likelihood tasks raise.
"""

from __future__ import annotations

from typing import Any

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(
        "skipvlm.lmms_eval needs lmms-eval (pip install lmms-eval); the rest of skipvlm works without it"
    ) from err

from skipvlm.data.chat import ChatCollator, ChatExample, load_processor
from skipvlm.eas import EASModel
from skipvlm.merge import load_pretrained
from skipvlm.plan import Plan
from skipvlm.runtime import apply_plan

__all__ = ["SkipVLM"]


@register_model("skipvlm")
class SkipVLM(lmms):
    """lmms-eval model: a local checkpoint, optionally with adapters (merged or not) or a skip plan.

    Args:
        pretrained: the checkpoint folder (a stock one, or one written by ``skipvlm merge``).
        adapters: an adapters folder from ``skipvlm train`` to put on it.
        merge: ``none``, ``static`` or ``per_example`` for those adapters.
        skip_attention: a plain skip plan, layers joined by ``-`` (e.g. ``3-5-7``).
        device: torch device; max_new_tokens: default generation length.
    """

    def __init__(
        self,
        pretrained: str,
        adapters: str | None = None,
        merge: str = "none",
        skip_attention: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 1,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ):
        super().__init__()
        model = load_pretrained(pretrained)
        if skip_attention:
            apply_plan(model, Plan(skip_attention=[int(x) for x in str(skip_attention).split("-")]))
        if adapters:
            model = EASModel.from_pretrained(model, adapters)
            if merge != "none":
                model = model.merge_and_unload(merge)
        self.model = model.to(device).eval()
        self.collator = ChatCollator(load_processor(pretrained))
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._device = device

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy answers; each request holds (context, gen kwargs, doc_to_visual, doc id, task, split)."""
        outputs = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            image = visuals[0] if visuals else None
            example = ChatExample(context.replace("<image>", "").strip(), "", image)
            batch = {k: v.to(self._device) for k, v in self.collator([example], train=False).items()}
            limit = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            ids = self.model.generate(**batch, max_new_tokens=limit, do_sample=False)
            text = self.collator.tokenizer.decode(
                ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for stop in gen_kwargs.get("until", []) or []:
                text = text.split(stop)[0]
            outputs.append(text.strip())
        return outputs

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the skipvlm lmms-eval model runs generation tasks only")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the skipvlm lmms-eval model runs single-round generation tasks only")
