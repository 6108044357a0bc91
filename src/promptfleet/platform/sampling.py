"""Per-request sampling parameters and a batched sampler.

Greedy rows take one vectorised argmax; sampled rows apply repetition penalty,
temperature, top-k and top-p, then draw with the request's own ``torch.Generator``
when it has a seed, so a seeded request gives the same text whatever its batch mates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from promptfleet.platform.native_kernels import kernel_support, native_kernels


# Temperature below this samples greedily (vLLM's convention): dividing logits by a
# temperature that underflows float32 (1e-300 -> 0) would give inf logits and NaN
# probabilities.
SAMPLING_EPS = 1e-5
# Documented bounds: within them no transform can overflow float32 for finite logits.
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (HF semantics: divide positive logits, multiply negative)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    detect_repetition: bool | None = None  # None = the engine's default

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= _number("temperature", self.temperature) <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0.0 < _number("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= _number("repetition_penalty", self.repetition_penalty) <= hi:
            raise ValueError(f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off), got {self.repetition_penalty}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


@dataclass
class SamplerRow:
    """What the sampler needs from one running sequence."""

    params: SamplingParams
    history: list[int]                       # prompt + generated ids (repetition penalty)
    generator: torch.Generator | None = field(default=None)


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not history:
        return logits
    idx = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    picked = logits.index_select(0, idx)
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


# Top-p looks for the nucleus among the most likely 256, then 4096 tokens (a topk is much
# cheaper than sorting 50k logits: README, Benchmarks); only rows whose nucleus is wider
# still are sorted whole.
NUCLEUS_CANDIDATES = (256, 4096)
# Inverse-CDF sampling in two levels: blocks of this many tokens, then one block.
DRAW_BLOCK = 256


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | list[int], top_p: float | list[float]) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and the top-p nucleus, row by row of a
    ``[R, V]`` batch (or one ``[V]`` row); ``top_k``/``top_p`` per row or one for all,
    applied in transformers' order (top-k, then top-p). Batched: one topk serves every row."""
    one_row = logits.dim() == 1
    x = logits[None] if one_row else logits
    rows = x.shape[0]
    ks = [top_k] * rows if isinstance(top_k, int) else list(top_k)
    ps = [top_p] * rows if isinstance(top_p, (int, float)) else list(top_p)
    out = filter_rows(x, torch.tensor(ks, dtype=torch.long, device=x.device),
                      torch.tensor(ps, dtype=torch.float64, device=x.device), max_k=max(ks), any_p=min(ps) < 1.0)
    return out[0] if one_row else out


def filter_rows(x: torch.Tensor, ks: torch.Tensor, ps: torch.Tensor, *, max_k: int, any_p: bool,
                exact_sort: bool | None = None) -> torch.Tensor:
    """``filter_top_k_top_p`` on tensors already on ``x``'s device (``ks`` int64, ``ps``
    float64, one per row; 0 / 1.0 = off), with what the host knows passed in (``max_k``,
    ``any_p``) so nothing here waits for the device. The nucleus is found by a cascade of
    topk candidates on CPU (data-dependent: it reads back how far each row got) and by one
    full sort where the logits live on a GPU (``exact_sort``; no read-back, and a sort of
    a few rows is cheap there). Both give the same mask."""
    rows, vocab = x.shape
    if 0 < max_k:
        ks = torch.where((ks > 0) & (ks < vocab), ks, torch.zeros_like(ks))
        kth = torch.topk(x, min(max_k, vocab), dim=-1).values.gather(1, (ks - 1).clamp(min=0)[:, None])
        x = x.masked_fill((ks > 0)[:, None] & (x < kth), float("-inf"))
    if any_p:
        probs = x.softmax(-1)
        if exact_sort if exact_sort is not None else x.device.type != "cpu":
            vals, idx = probs.sort(dim=-1, descending=True)
            outside = torch.ones(x.shape, dtype=torch.bool, device=x.device).scatter_(
                1, idx, _drop(vals, ps) & (ps < 1.0)[:, None])
        else:
            nucleus = (ps < 1.0).nonzero().flatten()
            outside = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            outside[nucleus] = _outside_nucleus(probs[nucleus], ps[nucleus])
        x = x.masked_fill(outside, float("-inf"))
    return x


def _outside_nucleus(probs: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """True for each token not in the smallest most-likely prefix whose mass reaches p
    (a token is kept when the mass before it is <= p)."""
    rows, vocab = probs.shape
    outside = torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
    todo = torch.arange(rows, device=probs.device)
    for k in (*(c for c in NUCLEUS_CANDIDATES if c < vocab), vocab):
        if not len(todo):
            break
        vals, idx = probs[todo].topk(k, dim=-1) if k < vocab else probs[todo].sort(dim=-1, descending=True)
        # the nucleus lies among these k when their mass passes p (then every later
        # token has more than p before it); with k = vocab it always does
        covered = (vals.double().sum(-1) > ps[todo] if k < vocab
                   else torch.ones(len(todo), dtype=torch.bool, device=probs.device))
        done = covered.nonzero().flatten()
        if len(done):
            outside[todo[done]] = torch.ones(len(done), vocab, dtype=torch.bool, device=probs.device).scatter_(
                1, idx[done], _drop(vals[done], ps[todo[done]]))
        todo = todo[~covered]
    return outside


def _drop(sorted_probs: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    before = sorted_probs.double().cumsum(-1) - sorted_probs.double()
    drop = before > ps[:, None]
    drop[:, 0] = False  # keep at least one token
    return drop


def uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """One float64 uniform per row from its own generator (on the host: cheap, and the
    same numbers whatever device the draw then runs on)."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]) if generators else \
        torch.zeros(0, dtype=torch.float64)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """One index per row of ``probs`` ``[R, V]``, row r's uniform from ``generators[r]``
    (``draw_with``)."""
    return draw_with(probs, uniforms(generators).to(probs.device)).tolist()


def draw_with(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` ``[R, V]`` by inverse-CDF sampling at the float64
    uniforms ``u`` ``[R]`` (on ``probs``' device): pick a block of ``DRAW_BLOCK`` tokens by
    its mass, then a token inside it. Exact in distribution, batched (a per-row
    ``torch.multinomial`` costs about as much for one row as this for a whole batch:
    README, Benchmarks), and made of tensor operations alone, so it runs where the logits
    are. A zero-probability token is never drawn (its CDF step is empty)."""
    rows, vocab = probs.shape
    full = vocab // DRAW_BLOCK
    mass = probs[:, : full * DRAW_BLOCK].unflatten(1, (full, DRAW_BLOCK)).sum(-1)
    if full * DRAW_BLOCK < vocab:
        mass = torch.cat([mass, probs[:, full * DRAW_BLOCK:].sum(-1, keepdim=True)], dim=1)
    mass = mass.double()
    cdf = mass.cumsum(-1)
    r = u * cdf[:, -1]
    b = torch.searchsorted(cdf, r[:, None], right=True).clamp_(max=mass.shape[1] - 1)  # first block past r
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(r[:, None]))
    # where r falls inside the chosen block, as a fraction of its mass (< 1 whatever the rounding)
    frac = ((r[:, None] - before) / mass.gather(1, b)).clamp_(0.0, 1.0 - 1e-12)
    cols = b * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=probs.device)  # [R, DRAW_BLOCK]
    inner = torch.where(cols < vocab, probs.gather(1, cols.clamp(max=vocab - 1)), 0.0).double().cumsum(-1)
    j = torch.searchsorted(inner, frac * inner[:, -1:], right=True).clamp_(max=DRAW_BLOCK - 1)
    return (b * DRAW_BLOCK + j).flatten()


def greedy_tokens(logits: torch.Tensor, *, native_argmax: bool = False) -> list[int]:
    """``logits.argmax(-1)`` as a list; with ``native_argmax`` (the engine runs on the native
    kernels) on the AVX-512 kernel for fp32 CPU logits, where it runs (about 10x faster than
    torch's CPU argmax at batch 32: README, Benchmarks; the kernel is fp32 only)."""
    if native_argmax and logits.dtype == torch.float32 and kernel_support(logits.device, logits.dtype).available:
        return native_kernels().argmax(logits)
    return logits.argmax(dim=-1).tolist()


def sample(logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator, *,
           native_argmax: bool = False) -> list[int | None]:
    """One token for each row of ``logits`` ``[B, V]`` (finite: the engine checks the hidden
    states they come from), on ``logits``' device; ``logits`` is not modified. A row whose
    own transforms (repetition penalty, temperature, top-k/top-p) leave no finite
    distribution gets ``None``, so the caller fails that request alone; every other row is
    unaffected. (``device_sampler.SamplerPlan``, which the engine builds before its forward.)"""
    from promptfleet.platform.device_sampler import SamplerPlan

    plan = SamplerPlan.build(rows, default_generator, device=logits.device)
    picked = plan.pick(logits, native_argmax=native_argmax).tolist()
    return [None if t < 0 else t for t in picked]
