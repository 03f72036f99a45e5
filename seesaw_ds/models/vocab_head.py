"""A vocabulary-parallel LM head: each tensor-parallel rank projects onto its own rows of the vocabulary.

AutoTP's head splits the hidden dimension, so every rank computes a partial sum of all V logits and an
all-reduce of the whole [B, V] block follows (at a decode batch of 47 and V = 49152, 9 MB per step in
fp32). Split by vocabulary rows instead, each rank holds complete logits for its slice, and greedy
decoding exchanges only each row's local maximum:

    rank r:  h [B, H] @ W[v0:v1].T -> local [B, V_r]           (full-width dot products, one rank's values)
    greedy:  (max, argmax) per row -> all-reduce [2, tp, B]     -> the same token on every rank
    else:    local written into zeros [B, V] -> all-reduce      -> full logits (adding zeros is exact)

A row's maximum is found on one rank over complete dot products, so the token is the one a single process
computing the same logits picks (ties go to the lowest vocabulary id, as `argmax` does).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from seesaw_ds.kv.native import row_max

# Token ids travel as float32 in the greedy exchange: exact below 2**24.
MAX_EXACT_ID = 1 << 24


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's rows of the vocabulary and the all-reduce over the ranks that hold the others."""
    start: int
    stop: int
    vocab: int
    rank: int                                       # index of this shard among `tp` shards (ascending rows)
    tp: int
    all_reduce: Callable[[torch.Tensor], None]      # in place, summed over the tp ranks

    def __post_init__(self):
        if not (0 <= self.start <= self.stop <= self.vocab and 0 <= self.rank < self.tp):
            raise ValueError(f"VocabShard rows [{self.start}, {self.stop}) of {self.vocab}, rank {self.rank} "
                             f"of {self.tp}: not a slice of the vocabulary")
        if self.vocab > MAX_EXACT_ID:
            raise ValueError(f"a vocabulary of {self.vocab} ids does not fit the float32 greedy exchange")


@dataclasses.dataclass
class ShardedLogits:
    """Last-position logits held as vocabulary slices across the tensor-parallel ranks."""
    local: torch.Tensor       # [B, V_r] float32: this rank's columns of the [B, V] logits
    shard: VocabShard

    def rows(self, index: torch.Tensor) -> "ShardedLogits":
        return ShardedLogits(self.local[index], self.shard)

    @staticmethod
    def cat(parts: list["ShardedLogits"]) -> "ShardedLogits":
        return ShardedLogits(torch.cat([p.local for p in parts]), parts[0].shard)

    def argmax(self) -> torch.Tensor:
        """[B] int64: the greedy token of every row, the same on every rank (a collective)."""
        s, b = self.shard, self.local.shape[0]
        exchange = self.local.new_zeros(2, s.tp, b)                      # [value | id, rank, row]
        if s.stop > s.start:
            values, ids = row_max(self.local)                            # first maximum of the row
            exchange[0, s.rank] = values
            exchange[1, s.rank] = (ids + s.start).float()
        else:                                                            # no rows here: never chosen
            exchange[0, s.rank] = float("-inf")
        s.all_reduce(exchange)
        winner = exchange[0].max(dim=0).indices                          # [B]; ties: the lowest rank
        return exchange[1].gather(0, winner[None]).squeeze(0).long()

    def full(self) -> torch.Tensor:
        """[B, V] float32 on every rank (a collective)."""
        s = self.shard
        whole = self.local.new_zeros(self.local.shape[0], s.vocab)
        whole[:, s.start:s.stop] = self.local
        s.all_reduce(whole)
        return whole


def rows_linear(weight: torch.Tensor) -> torch.nn.Linear:
    """An nn.Linear without bias whose weight is `weight` [V_r, H] itself (a view, never a copy)."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return head
