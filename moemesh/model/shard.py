"""How an expert splits for tensor parallelism inside an expert. Pure: no torch.

A SwiGLU expert y = (silu(x W1^T) * (x W3^T)) W2^T splits over S devices without any
communication between the two linears: shard i keeps columns [i*F/S, (i+1)*F/S) of the expert
hidden dimension F in W1 and W3 (column-parallel) and the same columns of W2 (row-parallel),
so it computes a partial (T, D) output from the whole (T, D) input, and the S partial outputs
sum to y. Dispatch therefore sends a token copy to every shard and combine sums what comes back.
"""

from __future__ import annotations

from typing import NamedTuple


class Shard(NamedTuple):
    """Part `index` of an expert split `count` ways; Shard(0, 1) is the whole expert."""

    # these names shadow tuple.index() and tuple.count() on purpose (a shard's index and count)
    index: int  # type: ignore[assignment]
    count: int  # type: ignore[assignment]

    def columns(self, expert_hidden: int) -> slice:
        """The slice of the expert hidden dimension F this shard holds."""
        assert expert_hidden % self.count == 0, "validated when the placement was accepted"
        width = expert_hidden // self.count
        return slice(self.index * width, (self.index + 1) * width)


WHOLE = Shard(0, 1)
