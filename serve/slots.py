"""SlotCache: the KV cache of a running batch whose rows come and go (continuous batching).

Rows live in slots 0..B-1 of tensors [R, K, C, D] per layer (R slots, C columns, both grown on demand). All
rows share one column clock: every decode step writes column `hi` for every row, so a step is one
batched forward over dense tensors, exactly the shape `Decoder.forward` and SDPA want. A row joins
right-aligned: its prompt's keys fill the columns just before `hi`, and the columns before them are
masked out for it (left padding, as `models.generate` pads a batch). Columns [lo, lo + N) hold the N
virtual tokens of a prompt/prefix-tuning adapter (N = 0 otherwise), shared by every row, as the
decoder expects them at the front of the cache.

Why slots and not pages: plain PyTorch attention (SDPA) reads dense [B, K, S, D] keys, so a paged
cache would have to be gathered into that shape every step, a copy of the whole cache per token. Here
a step copies nothing; the costs are elsewhere and bounded:
- padding: a row attends over (masked) columns up to the longest live row's context;
- joining copies only the new rows (plus the N virtual columns when the window must move left);
- leaving moves the last row into the freed slot (one row's copy), and columns that no live row
  uses any more are dropped from the front of the window (`lo` advances, nothing is copied);
- the tensors are reallocated (window copied to the front) only when the clock reaches C.
"""
from __future__ import annotations

import torch

from models.decoder import KVCache


class SlotCache:
    """Keys/values of up to `rows` sequences; `mask` [B, W] marks each live row's real columns (1)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_rows: int, head: int, dtype: torch.dtype,
                 device) -> None:
        self.kv_heads, self.head_dim, self.max_rows = kv_heads, head_dim, max_rows
        self.layers, self.head = layers, head  # head: virtual-token columns at the window's front
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lo, self.hi = 0, head  # the window [lo, hi) of columns in use
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [B, hi - lo - head]
        self._allocate(0, 0)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        """Columns held."""
        return self.keys[0].shape[2]

    @property
    def slots(self) -> int:
        """Rows held (grown as rows join, up to max_rows)."""
        return self.keys[0].shape[0]

    @property
    def width(self) -> int:
        """Real (non-virtual) columns in the window."""
        return self.hi - self.lo - self.head

    # ------------------------------------------------------------------ one decode step

    def view(self, reserve: int = 1) -> KVCache:
        """The live rows' window as a KVCache (writes go to this storage) with room for `reserve` new columns."""
        if self.hi + reserve > self.capacity:
            self._reallocate(0, 2 * (self.hi - self.lo + reserve) + 16, self.slots)
        B = self.rows
        return KVCache([k[:B, :, self.lo:] for k in self.keys], [v[:B, :, self.lo:] for v in self.values],
                       length=self.hi - self.lo)

    def advance(self, view: KVCache, alive: torch.Tensor) -> None:
        """After a forward on `view`: its new columns are in; `alive` [B] bool marks rows that took real tokens."""
        new = view.length - (self.hi - self.lo)
        self.hi = self.lo + view.length
        self.mask = torch.cat([self.mask, alive.long()[:, None].expand(-1, new)], dim=1)

    # ------------------------------------------------------------------ rows joining and leaving

    def join(self, other: KVCache, mask: torch.Tensor) -> None:
        """Append the rows of `other` (a prefill's cache: `head` virtual columns, then real columns with
        `mask` [b, w] marking the real ones) as new slots, right-aligned with the live rows."""
        b, w = mask.shape
        if self.rows + b > self.max_rows:
            raise ValueError(f"no free slot: {self.rows} rows live, {b} joining, {self.max_rows} slots at most")
        if self.rows + b > self.slots:  # grow by doubling, so joins rarely copy the live rows
            self._reallocate(self.lo, self.capacity, min(self.max_rows, max(2 * self.slots, self.rows + b)))
        if self.rows == 0:
            self.mask = torch.zeros(0, w, dtype=torch.long, device=self.device)
            if self.capacity < self.head + w + 1:
                self._allocate(self.slots, 2 * (self.head + w) + 16)
            self.lo, self.hi = 0, self.head + w
        elif w > self.width:
            self._widen(w - self.width)
        B = self.rows
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for layer in range(self.layers):
                mine[layer][B:B + b, :, self.lo:self.lo + self.head] = theirs[layer][:, :, :self.head]
                mine[layer][B:B + b, :, self.hi - w:self.hi] = theirs[layer][:, :, self.head:self.head + w]
        pad = torch.zeros(b, self.width - w, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.cat([pad, mask.to(self.device).long()], dim=1)], dim=0)

    def leave(self, slots: list[int]) -> list[int]:
        """Drop rows `slots`; returns the new order as old slot numbers (the last rows move into the holes)."""
        order = list(range(self.rows))
        for slot in sorted(slots, reverse=True):
            last = len(order) - 1
            if slot != last:
                for t in (*self.keys, *self.values):
                    t[slot] = t[last]
                self.mask[slot] = self.mask[last]
                order[slot] = order[last]
            order.pop()
        self.mask = self.mask[: len(order)]
        self._trim()
        return order

    # ------------------------------------------------------------------ the window

    def _trim(self) -> None:
        """Drop leading real columns that no live row uses (padding for all of them)."""
        if self.rows == 0:
            self.lo, self.hi = 0, self.head
            self.mask = self.mask[:, :0]
            return
        used = self.mask.any(dim=0).nonzero()
        drop = int(used[0]) if len(used) else self.width
        if drop:
            self._move_head(self.lo + drop)
            self.mask = self.mask[:, drop:]

    def _widen(self, extra: int) -> None:
        """`extra` more real columns on the left of the window (masked out for the live rows)."""
        if self.lo < extra:  # no room before the window: copy it further right
            self._reallocate(extra, max(self.capacity, 2 * (self.hi - self.lo + extra)) + 16, self.slots)
        self._move_head(self.lo - extra)
        self.mask = torch.cat([self.mask.new_zeros(self.rows, extra), self.mask], dim=1)

    def _move_head(self, lo: int) -> None:
        """Start the window at column `lo`, carrying the virtual columns along (the real ones stay put)."""
        if self.head:
            B = self.rows
            for t in (*self.keys, *self.values):
                t[:B, :, lo:lo + self.head] = t[:B, :, self.lo:self.lo + self.head].clone()
        self.lo = lo

    def _reallocate(self, at: int, capacity: int, slots: int) -> None:
        """Fresh tensors of `slots` rows and `capacity` columns holding the window from column `at`."""
        B, n = self.rows, self.hi - self.lo
        old_k, old_v = self.keys, self.values
        self._allocate(slots, capacity)
        for new, old in ((self.keys, old_k), (self.values, old_v)):
            for layer in range(self.layers):
                new[layer][:B, :, at:at + n] = old[layer][:B, :, self.lo:self.hi]
        self.lo, self.hi = at, at + n

    def _allocate(self, slots: int, capacity: int) -> None:
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
