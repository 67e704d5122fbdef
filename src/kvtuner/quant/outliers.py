"""Dense-and-sparse storage (KVQuant): the few values outside calibrated thresholds stay fp16, sparsely.

Why: one outlier stretches its quantization group's range and costs every other element of the
group precision. Elements outside calibrated thresholds are taken out of the dense part before
quantizing (:class:`kvtuner.method.KVMethod` decides what stands in for them) and keep their
exact value in a sparse side structure, so the only cost is its bytes.

Layout, for a history of ``[B, H, T, D]`` cut into blocks of ``block`` tokens (the cache flushes
whole windows): per block, ``counts`` int32 ``[B, H]`` outliers per (row, head); ``index`` int16,
each outlier's ``t * D + d`` inside its block (``block * D`` must stay below 2**15); ``values``
fp16. Entries are ordered by (block, row, head, t, d), so appending a block appends to all three.
Bytes: 4 per outlier plus 4 per (block, row, head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INDEX_LIMIT = 2**15


@dataclass
class SparseOutliers:
    counts: torch.Tensor  # int32 [n_blocks, B, H]
    index: torch.Tensor  # int16 [nnz]
    values: torch.Tensor  # float16 [nnz]
    block: int
    shape: torch.Size  # [B, H, T, D] of the dense tensor

    @property
    def count(self) -> int:
        return self.values.numel()

    def stored_tensors(self) -> list[torch.Tensor]:
        return [self.counts, self.index, self.values]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def mask_and_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense bool mask and fp16 values ``[B, H, T, D]`` (zeros where no outlier)."""
        b, h, t, d = self.shape
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        if self.count:
            n_blocks = self.counts.shape[0]
            cell = torch.arange(n_blocks * b * h, device=self.counts.device).repeat_interleave(
                self.counts.reshape(-1).long())
            blk, row, head = cell // (b * h), (cell // h) % b, cell % h
            local = self.index.long() & 0xFFFF
            tok, ch = blk * self.block + local // d, local % d
            mask[row, head, tok, ch] = True
            dense[row, head, tok, ch] = self.values
        return mask, dense

    def scatter_into(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, T, D] with the outliers written back (exact fp16 values)."""
        if not self.count:
            return x
        mask, dense = self.mask_and_values()
        return torch.where(mask, dense.to(x.dtype), x)

    def drop_front(self, blocks: int) -> "SparseOutliers":
        """These outliers without their first ``blocks`` blocks (entries are ordered by block first)."""
        nnz = int(self.counts[:blocks].sum())
        b, h, t, d = self.shape
        return SparseOutliers(self.counts[blocks:], self.index[nnz:], self.values[nnz:], self.block,
                              torch.Size((b, h, t - blocks * self.block, d)))

    def map(self, fn) -> "SparseOutliers":
        """Apply a batch-dim operation (index_select, repeat_interleave, ...) by way of the dense form."""
        mask, dense = self.mask_and_values()
        return extract(fn(dense), fn(mask), self.block)


def extract(x: torch.Tensor, mask: torch.Tensor, block: int) -> SparseOutliers:
    """The elements of ``x`` [B, H, T, D] where ``mask`` is set, as :class:`SparseOutliers` (``T`` a multiple of ``block``)."""
    b, h, t, d = x.shape
    if t % block:
        raise ValueError(f"token count {t} is not a multiple of the block {block}")
    if block * d >= INDEX_LIMIT:
        raise ValueError(f"a block of {block} tokens x {d} channels does not fit int16 outlier indices")
    n_blocks = t // block
    m = mask.reshape(b, h, n_blocks, block * d).permute(2, 0, 1, 3)
    counts = m.sum(-1, dtype=torch.int32)
    flat = x.reshape(b, h, n_blocks, block * d).permute(2, 0, 1, 3)
    where = m.nonzero(as_tuple=True)
    index = where[3].to(torch.int16)
    values = flat[where].to(torch.float16)
    return SparseOutliers(counts.contiguous(), index, values, block, torch.Size(x.shape))


def cat_blocks(parts: list[SparseOutliers]) -> SparseOutliers:
    """Concatenate along tokens (each part a whole number of blocks)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    tokens = sum(p.shape[2] for p in parts)
    return SparseOutliers(
        torch.cat([p.counts for p in parts]), torch.cat([p.index for p in parts]),
        torch.cat([p.values for p in parts]), first.block,
        torch.Size((*first.shape[:2], tokens, first.shape[3])),
    )
