"""skipvlm models as an lmms-eval model, so any plan (merged or not) runs lmms-eval's generation tasks.

With skipvlm and lmms-eval installed, lmms-eval finds the model ``skipvlm`` through the entry point in
:mod:`skipvlm.lmms_eval_plugin`; importing this module also registers it in the registries of older
lmms-eval releases (``MODEL_REGISTRY``, ``MODEL_REGISTRY_V2``, ``AVAILABLE_MODELS``)::

    lmms-eval --model skipvlm --model_args pretrained=runs/x/merged --tasks mme --batch_size 8
    # unmerged adapters on a base:  --model_args pretrained=BASE,adapters=runs/x/adapters,merge=static
    # a plain skip plan:            --model_args pretrained=BASE,skip_attention=3+5+7

Layer lists are joined by ``+``, since lmms-eval splits ``--model_args`` on commas. The model runs
lmms-eval's requests as its own models do: under ``accelerate launch --num_processes N -m lmms_eval``
(add ``--multi_gpu`` to run N processes on a machine without GPUs) the evaluator hands each process
its share of the documents through :attr:`SkipVLM.rank` and :attr:`SkipVLM.world_size`; requests are
batched by generation settings; ``until`` is a string or a list of stop strings; the prompt is the
processor's chat template (the format the model was trained on otherwise); all images of a document
go to the model. Only ``generate_until`` is implemented (generation tasks); log-likelihood tasks raise.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError(
        "skipvlm.lmms_eval needs lmms-eval (pip install lmms-eval); the rest of skipvlm works without it"
    ) from err

from accelerate import Accelerator

from skipvlm.data.chat import LEGACY_FORMAT, load_processor, template_owner
from skipvlm.eas import EASModel
from skipvlm.export import load_pretrained
from skipvlm.lmms_eval_plugin import CLASS_PATH, MODEL_NAME, manifest
from skipvlm.merge import MODES
from skipvlm.runtime import apply_plan, current_plan

__all__ = ["SkipVLM", "parse_layers"]

logger = logging.getLogger(__name__)

LAYER_SEPARATOR = "+"
DEFAULT_AUTO_BATCH = 32  # where batch_size=auto starts when lmms-eval gives no max_batch_size
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generation settings of lmms-eval tasks that go to `generate` as they are (sampling ones are handled apart)
_PASSED_ON = ("top_k", "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size")


def parse_layers(name: str, value: Any) -> list[int]:
    """Layer indices from an lmms-eval model argument: ``3`` or ``"3+5+7"`` (a list, from Python).

    Raises:
        ValueError: anything else; the message shows the syntax.
    """
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(LAYER_SEPARATOR)] if value.strip() else []
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isdigit())
        for v in items
    ):
        raise ValueError(
            f"{name}={value!r} is not a list of layers; join layer indices with '{LAYER_SEPARATOR}', e.g. "
            f"{name}=3{LAYER_SEPARATOR}5{LAYER_SEPARATOR}7 (lmms-eval splits --model_args on commas)"
        )
    return [int(v) for v in items]


def _batch_size(value: Any, maximum: Any) -> tuple[int, bool]:
    """(batch size, whether it adapts): lmms-eval passes an int, ``"N"``, ``"auto"`` or ``"auto:N"``."""
    text = str(value).strip().lower()
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        # lmms-eval's N re-detects the size N times; here the size only ever halves, on out-of-memory
        return int(maximum) if maximum else DEFAULT_AUTO_BATCH, True
    if text.isdigit() and int(text) >= 1:
        return int(text), False
    raise ValueError(f"batch_size={value!r}: use a positive integer, 'auto' or 'auto:N'")


def _pick_device(requested: str | None, accelerator: Accelerator) -> torch.device:
    """One process: ``requested``, else cuda when there is one; several: each its own (accelerate's)."""
    if accelerator.num_processes > 1:
        if requested and torch.device(requested).type != accelerator.device.type:
            where = (accelerator.process_index, accelerator.device)
            logger.warning("device=%s ignored: process %d runs on %s", requested, *where)
        return accelerator.device
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stop_strings(until: Any) -> list[str]:
    """lmms-eval's ``until``: one string or a list of them; empty strings stop nothing."""
    if until is None:
        return []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs until={until!r} must be a string or a list of strings")
    return [s for s in until if s]


def _sampling(gen_kwargs: dict[str, Any], default_tokens: int) -> dict[str, Any]:
    """``generate`` keywords from lmms-eval's generation settings (``until`` already taken out).

    Sampling is on when ``do_sample`` says so, else when ``temperature`` > 0 (lmms-eval's convention);
    ``temperature`` / ``top_p`` / ``top_k`` only go to ``generate`` when it samples.
    """
    settings = dict(gen_kwargs)
    temperature = float(settings.pop("temperature", 0.0) or 0.0)
    do_sample = settings.pop("do_sample", None)
    do_sample = temperature > 0 if do_sample is None else str(do_sample).lower() in ("true", "1")
    top_p = settings.pop("top_p", None)
    out: dict[str, Any] = {
        "max_new_tokens": int(settings.pop("max_new_tokens", default_tokens)),
        "num_beams": int(settings.pop("num_beams", 1) or 1),
        "do_sample": do_sample,
    }
    if do_sample:
        if temperature > 0:
            out["temperature"] = temperature
        if top_p is not None:
            out["top_p"] = float(top_p)
    for key in _PASSED_ON:
        if key in settings and (key != "top_k" or do_sample):
            out[key] = settings.pop(key)
    settings.pop("top_k", None)
    if settings:
        logger.debug("generation settings not used by skipvlm: %s", sorted(settings))
    return out


def _images(visuals: Any, where: str) -> list[Image.Image]:
    """The document's images, flattened one level as lmms-eval's models do; anything else is refused."""
    if visuals is None:
        return []
    out = []
    for item in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        for visual in item if isinstance(item, (list, tuple)) else [item]:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"{where} gives a {type(visual).__name__} visual ({str(visual)[:80]!r}); the skipvlm "
                    "lmms-eval model runs image tasks only (no video or audio)"
                )
            out.append(visual.convert("RGB"))
    return out


def _text_parts(content: Any) -> list[dict[str, Any]]:
    """Chat content as a list of parts (the form every multimodal chat template reads)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


class SkipVLM(lmms):
    """lmms-eval model: a local checkpoint, optionally with adapters (merged or not) or a skip plan.

    Args:
        pretrained: the checkpoint folder (a stock one, one saved with a plan, or one written by
            ``skipvlm merge``); its stored plan is applied.
        adapters: an adapters folder from ``skipvlm train`` to put on it.
        merge: ``none``, ``static`` or ``per_example`` for those adapters.
        skip_attention / skip_mlp: a skip plan, layers joined by ``+`` (e.g. ``3+5+7``). With
            ``adapters`` it must be a plan the adapters can run (theirs, or any for a supernet).
        device: torch device; default cuda when available; under ``accelerate launch`` each process
            takes its own.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        batch_size: ``N``, ``auto`` or ``auto:N`` (start at ``max_batch_size``, halve on out-of-memory).
        max_batch_size: where ``auto`` starts (default 32).
        max_new_tokens: generation length when the task does not set one.

    Raises:
        ValueError: an argument is malformed, arguments conflict (e.g. ``skip_attention`` that the
            adapters were not trained for, ``merge`` without ``adapters``), or the folder cannot be
            loaded (the message names the folder).
        TypeError: an unknown argument.
    """

    def __init__(
        self,
        pretrained: str,
        adapters: str | None = None,
        merge: str = "none",
        skip_attention: str | int | None = None,
        skip_mlp: str | int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(
                f"unknown skipvlm model argument(s) {sorted(kwargs)}; it takes pretrained, adapters, merge, "
                "skip_attention, skip_mlp, device, dtype, batch_size, max_batch_size, max_new_tokens"
            )
        if merge not in ("none", *MODES):
            raise ValueError(f"merge={merge!r}: use none, {' or '.join(MODES)}")
        if merge != "none" and not adapters:
            raise ValueError(f"merge={merge} folds adapters into the model; give adapters=FOLDER as well")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}")
        self._batch, self._auto_batch = _batch_size(batch_size, max_batch_size)
        if merge == "per_example" and (self._batch != 1 or self._auto_batch):
            raise ValueError(
                "merge=per_example folds each prompt's adapters into the weights: use batch_size=1"
            )
        skips = {}
        for name, value in (("skip_attention", skip_attention), ("skip_mlp", skip_mlp)):
            if value is not None:
                skips[name] = parse_layers(name, value)

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self._device = _pick_device(device, self.accelerator)
        self.pretrained = str(pretrained)
        try:
            model = load_pretrained(pretrained, dtype=_DTYPES[dtype])
            self.processor = load_processor(pretrained)
        except Exception as err:  # any loading failure: say which folder, keep the cause
            raise ValueError(f"skipvlm cannot load the model folder {pretrained}: {err}") from err
        self.model = self._planned(model, skips, adapters, merge).to(self._device).eval()
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._tokenizer.padding_side = "left"
        self._image_token = getattr(self.processor, "image_token", None)
        # who renders chat templates: the processor, else its tokenizer (as skipvlm's collator does)
        self._owner = template_owner(self.processor)
        self.max_new_tokens = int(max_new_tokens)
        self._chats: dict[str, tuple[list, bool]] = {}  # prompts apply_chat_template rendered: their chats
        plan, where = current_plan(self.model), (self._device, self._rank, self._world_size)
        logger.info("skipvlm model %s runs %s on %s (process %d of %d)", pretrained, plan, *where)

    def _planned(self, model: Any, skips: dict[str, list[int]], adapters: str | None, merge: str) -> Any:
        stored = current_plan(model)
        if adapters:
            try:
                model = EASModel.from_pretrained(model, adapters)
            except ValueError as err:
                raise ValueError(f"the adapters in {adapters} do not fit {self.pretrained}: {err}") from None
            wanted = model.plan.with_skips(**skips)
            if wanted != model.plan:
                try:
                    model.set_plan(wanted)
                except ValueError as err:
                    raise ValueError(
                        f"{_args(skips)} conflicts with the adapters in {adapters}, trained for "
                        f"{model.plan}: {err}; drop {' and '.join(skips)} to run the adapters' own plan"
                    ) from None
            return model.merge_and_unload(merge) if merge != "none" else model
        wanted = stored.with_skips(**skips)
        if wanted != stored:
            try:
                apply_plan(model, wanted)
            except ValueError as err:
                raise ValueError(
                    f"{_args(skips)} conflicts with the plan stored in {self.pretrained} ({stored}): {err}"
                ) from None
        return model

    # --- what lmms-eval reads --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        """The batch size in use (``auto`` halves it after an out-of-memory error)."""
        return self._batch

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        """The chat template of the processor (or its tokenizer); ``None`` if neither has one."""
        return self._owner.chat_template if self._owner is not None else None

    @property
    def tokenizer_name(self) -> str:
        """Names the prompt format in lmms-eval's request cache."""
        return self.pretrained.replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render a chat with the model's chat template (lmms-eval's ``--apply_chat_template``).

        The document's images are added when the request runs (the chat holds text only here).

        Raises:
            ValueError: the processor has no chat template.
        """
        if self.chat_template is None:
            raise ValueError(
                f"the processor of {self.pretrained} has no chat template; run without --apply_chat_template "
                "(skipvlm then writes the prompt format the model was trained with) or save one with it"
            )
        chat = [{**m, "content": _text_parts(m["content"])} for m in chat_history]
        text = self._render(chat, add_generation_prompt)
        self._chats[text] = (chat, add_generation_prompt)
        return text

    # --- requests --------------------------------------------------------------------------------

    def _render(self, chat: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if self._owner is self._tokenizer and not any(
            p.get("type") == "image" for m in chat for p in m["content"]
        ):
            # a text model's template reads plain strings
            chat = [{**m, "content": "".join(p.get("text", "") for p in m["content"])} for m in chat]
        return self._owner.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _prompt(self, context: str, images: list[Image.Image], where: str) -> str:
        """The model's prompt for one request with its images: the model's chat template if it has one,
        else :data:`~skipvlm.data.chat.LEGACY_FORMAT` (what skipvlm's collator writes); image
        placeholders already in ``context`` are kept."""
        token = self._image_token
        if images and token is None:
            raise ValueError(
                f"{where} has {len(images)} image(s), but {self.pretrained} is a text-only model"
            )
        placed = context.count(token) if token else 0
        if placed and placed != len(images):
            raise ValueError(
                f"{where}: the prompt holds {placed} {token} placeholder(s) for {len(images)} image(s)"
            )
        image_parts = [] if placed else [{"type": "image"}] * len(images)
        if context in self._chats:  # rendered by apply_chat_template: render again, with the images
            chat, generation = self._chats[context]
            if not image_parts:
                return context
            chat = [dict(m) for m in chat]
            last = max(i for i, m in enumerate(chat) if m["role"] == "user")
            chat[last]["content"] = image_parts + chat[last]["content"]
            return self._render(chat, generation)
        if self._owner is not None:
            return self._render(
                [{"role": "user", "content": [*image_parts, {"type": "text", "text": context}]}], True
            )
        return LEGACY_FORMAT.format(image=f"{token}\n" * len(image_parts), prompt=context)

    def _inputs(self, requests: Sequence[Any]) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            where = f"document {doc_id} of {task}/{split}"
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
            found = _images(visuals, where)
            texts.append(self._prompt(context, found, where))
            images += found
        # a chat template writes its own special tokens (e.g. BOS); the tokenizer must not add more
        encode = dict(padding=True, return_tensors="pt", add_special_tokens=self._owner is None)
        if images:
            batch = self.processor(text=texts, images=images, **encode)
        else:
            batch = self._tokenizer(texts, **encode)
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self._device, dtype) if v.is_floating_point() else v.to(self._device)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    @torch.no_grad()
    def _generate(self, requests: Sequence[Any]) -> list[str]:
        """Answers to requests that share their generation settings."""
        settings = dict(requests[0].args[1] or {})
        until = _stop_strings(settings.pop("until", None))
        generation = _sampling(settings, self.max_new_tokens)
        inputs = self._inputs(requests)
        ids = self.model.generate(**inputs, **generation)
        texts = self._tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out = []
        for text in texts:
            for stop in until:
                text = text.split(stop)[0]
            out.append(text.strip())
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Answers to lmms-eval's requests, in order.

        Each request's ``args`` are (context, generation settings, doc_to_visual, doc id, task, split).
        Requests with the same settings run in batches of :attr:`batch_size`.
        """
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc="skipvlm answering")
        for indices in groups.values():
            start = 0
            while start < len(indices):
                chunk = indices[start : start + self._batch]
                try:
                    texts = self._generate([requests[i] for i in chunk])
                except torch.OutOfMemoryError:
                    if not self._auto_batch or self._batch == 1:
                        raise
                    self._batch //= 2
                    logger.warning(
                        "out of memory at batch size %d; going on with %d", len(chunk), self._batch
                    )
                    continue
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                start += len(chunk)
                bar.update(len(chunk))
        bar.close()
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the skipvlm lmms-eval model runs generation tasks only")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the skipvlm lmms-eval model runs single-round generation tasks only")


def _args(skips: dict[str, list[int]]) -> str:
    return ",".join(f"{k}={LAYER_SEPARATOR.join(map(str, v))}" for k, v in skips.items())


def _register() -> None:
    """Register ``skipvlm`` in every model registry this lmms-eval has (the entry point covers 0.7)."""
    register_model(MODEL_NAME)(SkipVLM)  # lmms_eval.api.registry.MODEL_REGISTRY
    try:
        models = importlib.import_module("lmms_eval.models")
    except ImportError:  # pragma: no cover - a partial lmms-eval install
        return
    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        registry.register_manifest(manifest(), overwrite=True)
    available = getattr(models, "AVAILABLE_MODELS", None)
    if isinstance(available, dict):  # older releases import "module.Class" paths from it
        available.setdefault(MODEL_NAME, CLASS_PATH)


_register()
