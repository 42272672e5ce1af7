"""METER's task heads on the stock ``BridgeTowerModel``, their losses and metrics (``shared/METHODS.md`` §7).

The heads are new modules on top of the stock model (held as ``bridgetower``, as transformers' own
heads hold it), never a fork of it. ``z = [pooled text ; pooled image]`` is the stock model's
``pooler_output`` (each pooler: ``tanh(W h_cls + b)`` on the stream's first token), (B, 2C).

* VQA (:class:`BridgeTowerForVQA`): ``logits = W_2 GELU(LN(W_1 z + b_1)) + b_2`` (W_1: 2C -> 2C) over
  the answer vocabulary (``config.id2label``); loss ``A * BCE(sigmoid(logits), t)`` on soft scores
  ``t`` (B, A) (METER scales the mean BCE by the A answers); metric: the VQA score
  ``mean_b t_b[argmax logits_b]``.
* NLVR2 (:class:`BridgeTowerForNLVR2`): one text with two images; each (text, image_j) pair runs the
  model, ``logits = W_2 GELU(LN(W_1 [z_1 ; z_2] + b_1)) + b_2`` over 2 classes (W_1: 4C -> 2C); cross
  entropy; metric: accuracy. Both images take image token type 1 (the stock embedding has two types).
* Image-text matching / retrieval: the stock ``BridgeTowerForImageAndTextRetrieval`` (its ITM head,
  ``logits = W z + b`` over {no match, match}, cross entropy); :func:`retrieval_scores` scores every
  (text, image) pair by the match logit and :func:`recall_at_k` gives text->image and image->text R@k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BridgeTowerConfig, BridgeTowerModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerPreTrainedModel

__all__ = [
    "BridgeTowerForNLVR2",
    "BridgeTowerForVQA",
    "accuracy",
    "recall_at_k",
    "retrieval_scores",
    "vqa_loss",
    "vqa_score",
]


def _mlp(width: int, hidden: int, classes: int) -> nn.Sequential:
    """METER's classifier: ``W_2 GELU(LN(W_1 z + b_1)) + b_2``, W_1 (hidden, width), W_2 (classes, hidden)."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, classes)
    )


def _soft_targets(labels: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, A) soft scores from (B,) answer indices or (B, A) scores."""
    if labels.dim() == 1:
        return nn.functional.one_hot(labels.long(), classes).to(dtype)
    if labels.dim() != 2 or labels.shape[1] != classes:
        raise ValueError(
            f"VQA labels must be (B,) answer indices or (B, {classes}) soft scores, got shape "
            f"{tuple(labels.shape)}"
        )
    return labels.to(dtype)


def vqa_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``A * mean BCE(sigmoid(logits), t)``: logits (B, A), labels (B,) indices or (B, A) soft scores."""
    targets = _soft_targets(labels, logits.shape[-1], logits.dtype)
    return nn.functional.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]


def vqa_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The VQA score: the mean soft score of each example's top answer (accuracy for index labels)."""
    targets = _soft_targets(labels, logits.shape[-1], torch.float32)
    picked = targets.gather(1, logits.argmax(-1, keepdim=True))
    return float(picked.mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples whose top class is the label: logits (B, K), labels (B,)."""
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


class BridgeTowerForVQA(BridgeTowerPreTrainedModel):
    """VQA as classification over ``config.id2label``, METER's head on the stock model.

    Args:
        config: a ``BridgeTowerConfig`` whose ``id2label`` lists the answers (``num_labels`` of them).
    """

    def __init__(self, config: BridgeTowerConfig):
        super().__init__(config)
        self.bridgetower = BridgeTowerModel(config)
        self.classifier = _mlp(2 * config.hidden_size, 2 * config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """logits (B, A); ``loss`` with ``labels`` ((B,) answer indices or (B, A) soft scores)."""
        out = self.bridgetower(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs
        )
        logits = self.classifier(out.pooler_output)  # (B, 2C) -> (B, A)
        loss = vqa_loss(logits, labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BridgeTowerForNLVR2(BridgeTowerPreTrainedModel):
    """NLVR2-style two-image classification (is the statement true of the image pair?), METER's head.

    Args:
        config: a ``BridgeTowerConfig``.
    """

    def __init__(self, config: BridgeTowerConfig):
        super().__init__(config)
        self.bridgetower = BridgeTowerModel(config)
        self.classifier = _mlp(4 * config.hidden_size, 2 * config.hidden_size, 2)  # as METER: 4C -> 2C -> 2
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """``pixel_values`` (B, 2, 3, H, W): the two images of each example; logits (B, 2); ``loss``
        (cross entropy) with ``labels`` (B,)."""
        if pixel_values is None or pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"NLVR2 takes pixel_values of shape (B, 2, 3, H, W), two images each; got {shape}"
            )
        b = pixel_values.shape[0]
        pairs = pixel_values.transpose(0, 1).flatten(0, 1)  # (2B, 3, H, W): every first image, then seconds
        ids = input_ids.repeat(2, 1)  # (2B, T)
        mask = attention_mask.repeat(2, 1) if attention_mask is not None else None
        out = self.bridgetower(input_ids=ids, attention_mask=mask, pixel_values=pairs, **kwargs)
        z = torch.cat([out.pooler_output[:b], out.pooler_output[b:]], dim=-1)  # (B, 4C)
        logits = self.classifier(z)
        loss = nn.functional.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def retrieval_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N_text, N_image) match scores of an ITM model (``logits[:, 1]``) for every (text, image) pair.

    Args:
        model: ``BridgeTowerForImageAndTextRetrieval`` (or an EAS model on it).
        input_ids / attention_mask: (N_text, T) texts.
        pixel_values: (N_image, 3, H, W) images.
        batch_size: pairs per forward.
    """
    n_t, n_i = input_ids.shape[0], pixel_values.shape[0]
    t_idx = torch.arange(n_t).repeat_interleave(n_i)  # pair p = (t, i), row-major
    i_idx = torch.arange(n_i).repeat(n_t)
    device = next(model.parameters()).device
    scores = []
    for start in range(0, n_t * n_i, batch_size):
        t, i = t_idx[start : start + batch_size], i_idx[start : start + batch_size]
        out = model(
            input_ids=input_ids[t].to(device),
            attention_mask=attention_mask[t].to(device),
            pixel_values=pixel_values[i].to(device),
        )
        scores.append(out.logits[:, 1].float().cpu())
    return torch.cat(scores).view(n_t, n_i)


def recall_at_k(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall from a (N, N) score matrix whose diagonal pairs match.

    Returns:
        ``{"text_to_image_r@k": ..., "image_to_text_r@k": ...}`` for each k (k capped at N).
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"recall_at_k needs a square (N, N) score matrix, got {tuple(scores.shape)}")
    n = scores.shape[0]
    truth = torch.arange(n)
    out = {}
    for k in ks:
        kk = min(k, n)
        t2i = (scores.topk(kk, dim=1).indices == truth[:, None]).any(1).float().mean()
        i2t = (scores.t().topk(kk, dim=1).indices == truth[:, None]).any(1).float().mean()
        out[f"text_to_image_r@{k}"], out[f"image_to_text_r@{k}"] = float(t2i), float(i2t)
    return out
