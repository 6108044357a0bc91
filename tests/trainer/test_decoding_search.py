"""The decoding search after training: its samplers against transformers' own logits
processors (repetition penalty, top-p) and greedy decoding; its choice (the best exact
match, ties to greedy), its budget, and the defaults it derives from the references; and
its table in the job's metrics and in ``job watch``."""
from __future__ import annotations

import json

import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from promptfleet.trainer.backbone import load_tokenizer
from promptfleet.trainer.datasets import parse_dataset
from promptfleet.trainer.decoding_search import CANDIDATES, Candidate, sampler
from promptfleet.trainer.evaluate import exact_match, greedy_batch
from promptfleet.trainer.train import TrainConfig, train, train_dataset
from promptfleet.trainer.watch import evaluation_lines


def test_repetition_penalty_is_transformers_rule():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4
    prompts, generated = [[1, 2, 3], [4], []], [[5], [4, 6], []]
    seen = torch.tensor([[1, 2, 3, 5], [4, 4, 6, 6], [0, 0, 0, 0]])  # row 3: no history (a repeat of 0 below)
    pick = sampler(Candidate("x", repetition_penalty=1.7), prompts, seed=0)
    want = RepetitionPenaltyLogitsProcessor(1.7)(seen, logits.clone())
    want[2] = logits[2]  # transformers needs ids in every row; ours has no history there
    assert pick(logits.clone(), generated).tolist() == want.argmax(-1).tolist()


def test_top_p_keeps_transformers_nucleus():
    torch.manual_seed(1)
    logits = torch.randn(4, 40) * 3
    kept = TopPLogitsWarper(0.8)(torch.zeros(4, 1, dtype=torch.long), logits.clone()).isfinite()
    pick = sampler(Candidate("x", temperature=1.0, top_p=0.8), [[]] * 4, seed=3)
    for _ in range(200):  # every draw inside transformers' nucleus, and more than one token drawn
        token = pick(logits, [[], [], [], []])
        assert kept[torch.arange(4), token].all()
    draws = {tuple(pick(logits, [[]] * 4).tolist()) for _ in range(50)}
    assert len(draws) > 1


def test_sampled_candidates_are_seeded():
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    a = [sampler(CANDIDATES[2], [[], []], seed=9)(logits, [[], []]).tolist() for _ in range(1)]
    b = [sampler(CANDIDATES[2], [[], []], seed=9)(logits, [[], []]).tolist() for _ in range(1)]
    assert a == b


def _data(n: int, seed: int) -> bytes:
    words = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north"]
    rng = __import__("random").Random(seed)
    return "".join(json.dumps({"prompt": " ".join(rng.sample(words, 3)) + ":", "completion": " the fleet sails"})
                   + "\n" for _ in range(n)).encode()


def test_a_job_with_validation_tunes_its_decoding(tiny_checkpoint):
    cfg = TrainConfig(model_path=str(tiny_checkpoint), num_virtual_tokens=8, epochs=10, batch_size=4,
                      learning_rate=0.1, seed=4, decoding_budget=60)
    tok = load_tokenizer(tiny_checkpoint)
    examples, validation = (parse_dataset(_data(n, seed), tokenizer=tok, max_example_tokens=64, max_examples=100)
                            for n, seed in ((16, 0), (12, 1)))
    result = train(cfg, examples, validation=validation, keep_model=True)
    decoding = result.metrics["decoding"]
    assert decoding["examples"] == 10  # budget 60 / 6 settings
    assert [t["name"] for t in decoding["tried"]] == [c.name for c in CANDIDATES]
    accuracies = [t["accuracy"] for t in decoding["tried"]]
    assert accuracies[0] >= 0.5, accuracies  # it learned: greedy completes most references
    chosen = accuracies.index(max(accuracies))  # the first best (here greedy ties the repetition penalty)
    assert decoding["chosen"] == CANDIDATES[chosen].name
    longest = len(tok.encode(" the fleet sails")) + 1  # EOS included
    assert decoding["best"] == {**CANDIDATES[chosen].defaults(), "max_tokens": 2 * longest + 3, "stop": ["\n"]}
    # the greedy row is the validation accuracy evaluate() measured on the same examples
    model = result.model.eval()
    outs = greedy_batch(model, [e.prompt_ids for e in validation[:10]], max_new_tokens=longest + 3, eos_id=50256,
                        pad_id=50256)
    hits = sum(exact_match(tok.decode([t for t in o if t != 50256]), " the fleet sails") for o in outs)
    assert decoding["tried"][0]["accuracy"] == hits / 10
    lines = evaluation_lines(result.metrics)
    assert lines[-2].startswith("decoding on 10 validation examples: greedy ")
    assert lines[-1] == f"-> generation defaults {json.dumps(decoding['best'])}"


def test_no_search_without_validation_or_when_off(tiny_checkpoint):
    base = dict(model_path=str(tiny_checkpoint), num_virtual_tokens=4, epochs=1, batch_size=4, seed=4)
    assert "decoding" not in train_dataset(TrainConfig(**base), _data(8, 0), max_example_tokens=64).metrics
    off = train_dataset(TrainConfig(**base, tune_decoding=False), _data(8, 0), max_example_tokens=64,
                        validation_data=_data(4, 1))
    assert "decoding" not in off.metrics and "zero_shot" in off.metrics
