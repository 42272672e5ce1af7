"""Token layouts: which of a prompt's positions a decoder layer runs on, packed per example.

``shared/METHODS.md`` §4. Once visual tokens leave, each example keeps a different number of positions.
The remaining ones are packed to the right of a ``(B, T')`` layout (left padding, as a padded batch is
laid out anyway), so that the stock mask builders, attention kernels and KV cache see an ordinary
left-padded batch. Every position keeps its original position id; a layout records, per slot, the
original position it holds.
"""

from __future__ import annotations

import torch

__all__ = ["gather_positions", "gather_tokens", "pack", "scatter_tokens"]


def pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the kept positions of each row to the right, in order.

    Args:
        keep: (B, T) bool, the positions to keep.

    Returns:
        ``(index, mask)``, both (B, T') with ``T' = max kept per row``: ``index[b, j]`` is the original
        position in slot j (0 in padding slots) and ``mask[b, j]`` is True for real slots.
    """
    batch, length = keep.shape
    count = keep.sum(1)  # (B,)
    width = int(count.max()) if batch else 0
    rank = keep.long().cumsum(1) - 1  # (B, T): rank of each kept position within its row
    slot = rank + (width - count)[:, None]  # (B, T): its slot in the right-aligned layout
    slot = torch.where(keep, slot, torch.full_like(slot, width))  # dropped positions go to a spare slot
    positions = torch.arange(length, device=keep.device).expand(batch, -1)
    index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, positions)
    index = index[:, :width]  # (B, T')
    mask = torch.arange(width, device=keep.device)[None] >= (width - count)[:, None]  # (B, T')
    return index * mask, mask


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for x of shape (B, T, ...) and index (B, T')."""
    shape = index.shape + x.shape[2:]
    flat = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, flat)


def scatter_tokens(
    home: torch.Tensor, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A copy of ``home`` (B, T, C) with ``x[b, j]`` (B, T', C) written at ``index[b, j]`` for real slots."""
    out = home.clone()
    rows, slots = mask.nonzero(as_tuple=True)
    out[rows, index[rows, slots]] = x[rows, slots]
    return out


def gather_positions(ids: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Position ids of the slots: ids (B, T), (1, T) or M-RoPE's (3, B, T); None stays None."""
    if ids is None:
        return None
    batch = index.shape[0]
    if ids.dim() == 3:  # (3, B, T) -> (3, B, T')
        ids = ids.expand(-1, batch, -1)
        return ids.gather(2, index[None].expand(ids.shape[0], -1, -1))
    return ids.expand(batch, -1).gather(1, index)
