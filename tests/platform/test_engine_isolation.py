"""Per-request failure isolation: a request whose row goes non-finite, or whose step
raises, fails alone; every other request in the batch gets exactly the tokens it gets
when it runs alone, and a slot a failed request poisoned is clean for its next owner.
Run on every linear/attention backend this machine has, and on a Llama on the default
(native where they run) kernels."""
from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

from promptfleet.platform.adapter import AdapterPrefix, load_adapter_dir
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine, RequestFailedError
from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing import make_peft_adapter

BACKENDS = [("auto", "auto"), ("onednn", "sdpa"), ("torch", "sdpa"), ("llama", "auto")]
POISON = 60  # the position whose embedding is NaN: only the victim ever reaches it


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, 5000) for _ in range(n)]


def _params(i: int, max_tokens: int) -> SamplingParams:
    if i % 2:  # seeded sampling: the same text whatever the batch mates
        return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i,
                              detect_repetition=False)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, detect_repetition=False)


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    """A small random Llama (grouped-query, head_dim 32) and PEFT adapters made on it."""
    root = tmp_path_factory.mktemp("isolation-llama")
    # untied head: the poison below (one token's input embedding) must not reach the logits
    base = make_random_llama_checkpoint(root / "base", shape="llama-small-test", seed=31, scale=6.0,
                                        tie_word_embeddings=False)
    specs = {"pt_a": ("prompt_tuning", 7, 1), "prefix": ("prefix_tuning", 6, 4), "ptune": ("p_tuning", 5, 3)}
    return base, {name: make_peft_adapter(base, root / name, m, n, s) for name, (m, n, s) in specs.items()}


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b[0]}-{b[1]}")
def engine(request, small_checkpoint, peft_adapters):
    linear, attention = request.param
    adapters = peft_adapters
    if linear == "llama":
        checkpoint, adapters = request.getfixturevalue("llama_setup")
        linear = "auto"
    else:
        checkpoint = small_checkpoint
    eng = Engine.from_pretrained(checkpoint, EngineConfig(max_batch_size=16, linear_kernels=linear,
                                                          attention=attention))
    for name in ("pt_a", "prefix", "ptune"):
        eng.add_adapter(name, load_adapter_dir(adapters[name]))
    yield eng
    eng.stop()


def _bystanders() -> list[tuple[list[int], str | None, SamplingParams]]:
    """Short requests over several adapters; prefix + prompt + output stays below POISON."""
    adapters = [None, "pt_a", "prefix", "ptune", "pt_a", None]
    return [(_ids(i, 5 + i), a, _params(i, 24)) for i, a in enumerate(adapters)]


async def _alone(engine: Engine, reqs) -> list[list[int]]:
    return [(await engine.complete(ids, p, adapter=a)).token_ids for ids, a, p in reqs]


async def _together(engine: Engine, reqs, victim=None):
    async def one(ids, a, p):
        try:
            return (await engine.complete(ids, p, adapter=a)).token_ids
        except RequestFailedError as exc:
            return exc
    tasks = [] if victim is None else [asyncio.ensure_future(one(*victim))]
    await asyncio.sleep(0)  # the victim is admitted first, into slot 0
    tasks += [asyncio.ensure_future(one(*r)) for r in reqs]
    return await asyncio.gather(*tasks)


class _Poison:
    """Make one row go non-finite mid-decode, on a path only the victim takes.

    GPT-2: a NaN position embedding at ``POISON``, a position only the victim reaches.
    Llama (RoPE, no position table): a NaN input embedding for a token the victim
    generates ~10 tokens in and that no bystander reads or writes (the Llama fixture's
    head is untied, so the logits every row scores stay finite)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.positional = hasattr(engine.model, "wpe")
        self.table = engine.model.wpe.weight if self.positional else engine.model.wte.weight
        self.row: int | None = None
        self.clean: torch.Tensor | None = None

    async def arm(self, victim, bystanders) -> None:
        if self.positional:
            row = POISON
        else:
            seen = {t for ids, _, _ in bystanders for t in ids}
            seen |= {t for out in await _alone(self.engine, bystanders) for t in out}
            own = (await _alone(self.engine, [victim]))[0]
            row = next(t for i, t in enumerate(own) if i >= 8 and t not in seen
                       and t not in victim[0] and t not in own[:i])
        self.row, self.clean = row, self.table[row].clone()
        with torch.no_grad():
            self.table[row] = float("nan")

    def disarm(self) -> None:
        if self.row is not None:
            with torch.no_grad():
                self.table[self.row] = self.clean
            self.row = None


async def test_row_going_non_finite_mid_batch_fails_alone(engine):
    short = (_ids(7, 6), None, _params(0, 30))
    long = (_ids(8, 70), "pt_a", _params(2, 30))
    want = await _alone(engine, [short, long])  # before any slot is poisoned
    reqs = _bystanders()
    poison = _Poison(engine)
    # the victim reaches the poison after ~10 generated tokens, while every bystander still runs
    for victim_params in (SamplingParams(max_tokens=40, temperature=0.0, detect_repetition=False),
                          SamplingParams(max_tokens=40, temperature=0.8, seed=7, detect_repetition=False)):
        victim = (_ids(99, 50), None, victim_params)
        await poison.arm(victim, reqs)
        alone = await _alone(engine, reqs)  # poisoned: the bystanders never touch the poison
        got = await _together(engine, reqs, victim)
        poison.disarm()
        err = got[0]
        assert isinstance(err, RequestFailedError) and err.code == "numerical_error", err
        assert "nan" in str(err).lower() and "no other request" in str(err)
        assert got[1:] == alone
    # the victim's slot held NaN keys/values past the poison; with the table clean again, a
    # short request in that slot decodes beside a long one (which reads keys that far in)
    assert await _together(engine, [long], short) == want  # short first: slot 0, the victim's
    assert engine.stats().running == 0 and engine.stats().kv_reserved_tokens == 0


def _fault_when(engine: Engine, bad) -> None:
    """Make the step's forward (the runner's: the module forward or a decode replay) raise
    (with internal text) whenever ``bad(ids, positions)``."""
    forward = engine.runner.forward

    def faulty(batch):
        if bad(batch.ids, batch.positions):
            raise RuntimeError("secret internal detail 0xdeadbeef")
        return forward(batch)
    engine.runner.forward = faulty


@pytest.mark.parametrize("trigger", ["newest-admission", "old-sequence"])
async def test_step_that_raises_fails_only_its_culprit(engine, trigger):
    reqs = _bystanders()
    alone = await _alone(engine, reqs)
    if trigger == "newest-admission":  # a token only the victim's prompt holds
        marker = 49999
        victim_ids = _ids(5, 8) + [marker]
        _fault_when(engine, lambda ids, pos: bool((ids == marker).any()))
        tasks_first = False
    else:  # the victim was admitted first and fails later, at a position nobody else reaches
        victim_ids = _ids(6, 40)
        _fault_when(engine, lambda ids, pos: bool((pos >= 50).any()))
        tasks_first = True
    victim = (victim_ids, None, SamplingParams(max_tokens=30, temperature=0.0, detect_repetition=False))
    if tasks_first:
        got = await _together(engine, reqs, victim)
        err, rest = got[0], got[1:]
    else:
        async def late_victim():
            await asyncio.sleep(0.05)  # admitted after the bystanders: the newest admission
            return (await _together(engine, [victim]))[0]
        *rest, err = await asyncio.gather(_together(engine, reqs), late_victim())
        rest = rest[0]
    assert isinstance(err, RequestFailedError) and err.code == "engine_error", err
    assert "0xdeadbeef" not in str(err)
    assert rest == alone
    assert engine.stats().running == 0 and engine.stats().kv_reserved_tokens == 0


async def test_extreme_sampling_numbers_are_greedy_or_refused(engine):
    ids = _ids(3, 9)
    greedy = (await engine.complete(ids, SamplingParams(max_tokens=12, temperature=0.0))).token_ids
    for t in (1e-300, 5e-324, 1e-6):  # below the epsilon: greedy, not a division by ~0
        got = await engine.complete(ids, SamplingParams(max_tokens=12, temperature=t))
        assert got.token_ids == greedy, t
    for bad in (dict(repetition_penalty=1e-300), dict(repetition_penalty=math.inf), dict(temperature=math.nan),
                dict(top_p=0.0), dict(temperature=1e300), dict(top_p=math.nan)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


async def test_non_finite_or_foreign_prefix_is_refused_before_it_runs(engine):
    ok = engine.adapters["pt_a"]
    nan_k = ok.k.clone()
    nan_k[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        await engine.complete([1, 2, 3], SamplingParams(max_tokens=2),
                              adapter=AdapterPrefix(key="bad", peft_type=ok.peft_type, k=nan_k, v=ok.v))
    with pytest.raises(ValueError, match="shape"):
        await engine.complete([1, 2, 3], SamplingParams(max_tokens=2),
                              adapter=AdapterPrefix(key="bad", peft_type=ok.peft_type, k=ok.k[:, :1], v=ok.v[:, :1]))
    assert engine.stats().running == 0
