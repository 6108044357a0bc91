"""The sampler, on the logits' device: one token id per row comes back to the host.

``SamplerPlan.build`` runs on the host BEFORE the step's forward: it reads each row's
parameters, draws each sampled row's uniform from its own ``torch.Generator`` (a seeded
request's draws depend on its seed alone, never on its batch mates or the device), and
registers the small tensors (row indices, temperatures, top-k/top-p, penalties and
histories, uniforms) with the step's ``StepStaging``, so they reach the device in the
step's one copy. ``pick`` then runs on the device: repetition penalty, greedy argmax,
temperature, top-k/top-p, softmax and the inverse-CDF draw (``sampling.draw_with``), and
returns ``[R]`` int32 ids, -1 for a row that cannot be sampled (its hidden state, or its
own transformed distribution, is not finite). The engine reads those R ints back: the
only device-to-host transfer of a step. Nothing in ``pick`` waits for the device: every
branch is decided from what the host knows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from promptfleet.platform.sampling import (SamplerRow, filter_rows, greedy_tokens, uniforms, draw_with)
from promptfleet.platform.staging import Staged, StepStaging


@dataclass
class SamplerPlan:
    rows: int
    greedy: Staged | None          # [G] row indices
    sampled: Staged | None         # [S] row indices
    temps: Staged | None           # [S] float64
    top_k: Staged | None           # [S] int64 (0 = off)
    top_p: Staged | None           # [S] float64 (1 = off)
    u: Staged | None               # [S] float64 uniforms
    max_k: int
    any_p: bool
    penalised: Staged | None       # [P] row indices
    penalty: Staged | None         # [P] float64
    history: Staged | None         # [P, L] token ids (each row's distinct ids, padded with its first)
    generators: list[tuple[torch.Generator, torch.Tensor]]  # states before the draws (rewind)

    @classmethod
    def build(cls, rows: list[SamplerRow], default_generator: torch.Generator, *, device: torch.device,
              stage: StepStaging | None = None) -> "SamplerPlan":
        own = stage is None
        stage = stage or StepStaging(device)
        add = lambda values, dtype: stage.add(torch.tensor(values, dtype=dtype)) if values else None  # noqa: E731
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        params = [rows[i].params for i in sampled]
        gens = [rows[i].generator if rows[i].generator is not None else default_generator for i in sampled]
        saved = {id(g): (g, g.get_state()) for g in gens}
        penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and r.history]
        history = None
        if penalised:
            distinct = [sorted(set(rows[i].history)) for i in penalised]
            width = max(len(d) for d in distinct)
            history = stage.add(torch.tensor([d + [d[0]] * (width - len(d)) for d in distinct], dtype=torch.long))
        plan = cls(rows=len(rows), greedy=add(greedy, torch.long), sampled=add(sampled, torch.long),
                   temps=add([p.temperature for p in params], torch.float64),
                   top_k=add([p.top_k for p in params], torch.long),
                   top_p=add([p.top_p for p in params], torch.float64),
                   u=stage.add(uniforms(gens)) if gens else None,
                   max_k=max((p.top_k for p in params), default=0), any_p=any(p.top_p < 1.0 for p in params),
                   penalised=add(penalised, torch.long),
                   penalty=add([rows[i].params.repetition_penalty for i in penalised], torch.float64),
                   history=history, generators=list(saved.values()))
        if own:
            stage.flush()
        return plan

    def rewind(self) -> None:
        """Put every generator this plan drew from back as it was (a step that raised runs again)."""
        for gen, state in self.generators:
            gen.set_state(state)

    def pick(self, logits: torch.Tensor, *, valid: torch.Tensor | None = None, native_argmax: bool = False,
             exact_sort: bool | None = None, vocab_size: int | None = None) -> torch.Tensor:
        """``[R]`` int32 token ids for ``logits`` ``[R, V]`` (float32), -1 where a row fails;
        ``valid`` (``[R]`` bool on the device) marks rows whose hidden state was finite.
        ``logits`` is not modified; an id at or past ``vocab_size`` (default: the logits'
        width) is a failed row too. ``exact_sort``: the GPU's nucleus path (one full sort)
        wherever the logits are (None: by their device; see ``sampling.filter_rows``)."""
        rows, vocab = logits.shape
        dev = logits.device
        failed = torch.zeros(rows, dtype=torch.bool, device=dev) if valid is None else ~valid
        # keep the batched kernels below on finite input (on CPU, where asking costs nothing,
        # only when a row is not finite: the copy is the size of the logits)
        if valid is not None and (dev.type != "cpu" or not bool(valid.all())):
            logits = torch.where(valid[:, None], logits, torch.zeros((), dtype=logits.dtype, device=dev))
        if self.penalised is not None:
            logits = logits.clone() if valid is None else logits
            idx, hist = self.penalised.get(), self.history.get()
            penalty = self.penalty.get().to(logits.dtype)[:, None]
            sub = logits.index_select(0, idx)
            picked = sub.gather(1, hist)
            sub = sub.scatter(1, hist, torch.where(picked > 0, picked / penalty, picked * penalty))
            bad = ~torch.isfinite(sub).all(-1)
            failed = failed.clone()
            failed[idx] = failed[idx] | bad
            logits = logits.index_copy(0, idx, torch.where(bad[:, None], torch.zeros_like(sub), sub))
        out = torch.zeros(rows, dtype=torch.long, device=dev)
        if self.greedy is not None:
            g = self.greedy.get()
            every = g.shape[0] == rows  # all rows greedy (the common batch): no row gather
            rows_g = logits if every else logits.index_select(0, g)
            if native_argmax and dev.type == "cpu":
                picked = torch.tensor(greedy_tokens(rows_g, native_argmax=True), dtype=torch.long)
            else:
                picked = rows_g.argmax(-1)
            if every:
                out = picked
            else:
                out[g] = picked
        if self.sampled is not None:
            s = self.sampled.get()
            # temperature >= SAMPLING_EPS here (below it a row is greedy), so it cannot underflow
            x = logits if s.shape[0] == rows else logits.index_select(0, s)
            x = x / self.temps.get().to(logits.dtype)[:, None]
            x = filter_rows(x, self.top_k.get(), self.top_p.get(), max_k=self.max_k, any_p=self.any_p,
                            exact_sort=exact_sort)
            probs = x.softmax(-1)
            finite = torch.isfinite(probs).all(-1)
            if dev.type != "cpu" or not bool(finite.all()):  # as above: CPU asks first, a GPU never waits
                probs = torch.where(finite[:, None], probs, torch.full_like(probs, 1.0 / vocab))
            failed = failed.clone()
            failed[s] = failed[s] | ~finite
            out[s] = draw_with(probs, self.u.get())
        limit = vocab if vocab_size is None else min(vocab, vocab_size)
        return torch.where(failed | (out < 0) | (out >= limit), -1, out).to(torch.int32)
