"""One engine step's forward, and the one place its fast path is chosen.

``ModelRunner.forward(batch)`` runs the model's own forward (embeddings, the blocks through
the step's attention context, the final norm), except for a decode-only step on the native
kernels (one group of one-token rows, every row on the native attention kernel, the model's
linears native): there the blocks run as a replay of their own kernel calls
(``native_trace``), recorded once per padded batch size from the module path itself, so
no Python runs between the kernels and no second copy of a block's math exists. The models
know nothing of this; any forward that cannot be replayed (a torch operation between the
kernels) logs why once and keeps the module path for that batch size. On CUDA, a
decode-only step runs as a CUDA graph of its batch-size bucket instead (``decode_graphs``,
flash and flex backends), prompt steps eagerly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from promptfleet.platform.decode_graphs import DecodeGraphs
from promptfleet.platform.kv_cache import SlotBatch, SlotKVCache
from promptfleet.platform.native_trace import DecodeGraph, NotReplayable, capture
from promptfleet.platform.step_input import StepInput

log = logging.getLogger(__name__)


class DecodeContext:
    """Attention for the rows of a replayable decode step: the first ``rows`` of ``P``
    padded rows attend over cache slots ``0..rows-1`` (``lens``: each row's length after
    this step's token); the padded rows' outputs are left as they are."""

    def __init__(self, cache: SlotKVCache, lens: torch.Tensor, rows: int) -> None:
        self.cache, self.lens, self.rows = cache, lens, rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, padded, heads, dim = q.shape
        out = torch.empty(padded, heads, dim, dtype=q.dtype)
        r = self.rows
        self.cache.decode_kernels.decode_attention(q[0, :r], self.cache.k[layer], self.cache.v[layer], 0,
                                                   self.lens[:r], k_new=k[0, :r], v_new=v[0, :r], out=out)
        return out.view(1, padded, heads, dim)


@dataclass
class _Replay:
    """Static inputs of one padded batch size, and the graph recorded over them."""

    x: torch.Tensor          # [1, P, d] embeddings
    positions: torch.Tensor  # [1, P]
    lens: torch.Tensor       # [P] int32
    graph: DecodeGraph | None = None


class ModelRunner:
    def __init__(self, model, cache: SlotKVCache, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.cache, self.graphs = model, cache, graphs
        self.kernels = cache.decode_kernels
        # replay needs native attention and native linears (whose calls it records)
        self.replays = self.kernels is not None and model.linear_kernels == "avx512"
        self._by_rows: dict[int, _Replay | None] = {}  # padded rows -> replay (None: not replayable)

    def forward(self, batch: StepInput) -> torch.Tensor:
        """Hidden states after the final norm, ``[1, N, d]``."""
        groups = batch.ctx.groups
        if self.replays and len(groups) == 1 and groups[0].native_lens is not None and groups[0].slot0 == 0:
            hidden = self._decode(batch, groups[0])
            if hidden is not None:
                return hidden
        if (self.graphs is not None and len(groups) == 1 and isinstance(groups[0], SlotBatch) and groups[0].T == 1
                and groups[0].slot0 == 0 and groups[0].native_lens is None):
            hidden = self.graphs.run(batch.ids, batch.positions, groups[0].B)  # a CUDA graph per bucket
            if hidden is not None:
                return hidden
        return self.model(batch.ids, batch.positions, batch.ctx)

    def _decode(self, batch: StepInput, group: SlotBatch) -> torch.Tensor | None:
        rows, model = group.B, self.model
        padded = self.kernels.padded_rows(rows)
        if padded not in self._by_rows:
            self._by_rows[padded] = _Replay(torch.zeros(1, padded, model.config.n_embd, dtype=model.wte.weight.dtype),
                                            torch.zeros(1, padded, dtype=torch.long),
                                            torch.ones(padded, dtype=torch.int32))
        replay = self._by_rows[padded]
        if replay is None:
            return None
        replay.x[:, :rows] = model.embed(batch.ids, batch.positions)
        replay.positions[:, :rows] = batch.positions
        replay.lens[:rows] = group.native_lens
        if replay.graph is None:
            try:
                replay.graph = capture(lambda: model.run_blocks(replay.x, replay.positions,
                                                                DecodeContext(self.cache, replay.lens, rows)), rows)
                out = replay.graph.output  # the capture ran this step
            except NotReplayable as exc:
                log.warning("decode steps of %d rows keep the module path: %s", padded, exc)
                self._by_rows[padded] = None
                return None
            log.info("recorded the decode step for %d rows: %d kernel calls, %.1f MB of buffers", padded,
                     len(replay.graph.calls), replay.graph.arena.numel() / 1e6)
        else:
            out = replay.graph.replay(rows)
        return model.final_norm(out[:, :rows])
