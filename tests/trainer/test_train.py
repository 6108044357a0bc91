"""The training loop on the tiny checkpoint: it learns, it is deterministic, and what it
exports loads in PEFT to the very model it trained."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from promptfleet.platform.adapter import parse_adapter_files
from promptfleet.platform.config import ModelConfig
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.trainer.datasets import parse_dataset
from promptfleet.trainer.train import TrainConfig, TrainingCancelled, batch_order, collate, total_steps, train

COMPLETION = " yes"


def learnable_jsonl(n: int = 24, seed: int = 0, completion: str = COMPLETION) -> bytes:
    """Every prompt (random words) has the same completion: a soft prompt can learn it."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north", "quiet", "lamp"]
    lines = [json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + ":",
                         "completion": completion}) for _ in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def examples(tiny_checkpoint: Path):
    return parse_dataset(learnable_jsonl(), tokenizer=load_tokenizer(tiny_checkpoint), max_example_tokens=64,
                         max_examples=1000)


def greedy(model, tok, prompt: str, n: int = 8) -> list[int]:
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_collate_masks_prompt_and_padding():
    from promptfleet.trainer.datasets import Example

    batch = collate([Example("a", "b", (1, 2), (3, 50256)), Example("c", "d", (4,), (5, 6, 50256))], pad_id=50256)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 50256], [4, 5, 6, 50256]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 50256], [-100, 5, 6, 50256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    batch = collate([Example("a", "b", (1,), (3, 50256)), Example("c", "d", (4, 4), (5, 6, 50256))], pad_id=50256)
    assert batch["labels"][0].tolist() == [-100, 3, 50256, -100, -100]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]


def test_batch_order_covers_every_example_each_epoch():
    order = batch_order(10, batch_size=4, steps=6, seed=3)
    assert [len(b) for b in order] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(order[:3], [])) == list(range(10)) == sorted(sum(order[3:], []))
    assert order == batch_order(10, batch_size=4, steps=6, seed=3) != batch_order(10, batch_size=4, steps=6, seed=4)
    assert total_steps(10, epochs=5, batch_size=4, max_steps=7) == 7
    assert total_steps(10, epochs=2, batch_size=4, max_steps=None) == 6


# Prompt tuning moves the output only through attention to the soft prompt; the 2-layer
# tiny checkpoint's saturated attention (weights scaled x8) leaves it too little room, so
# prompt tuning learns on the 4-layer small checkpoint. Prefix tuning sets K/V directly.
@pytest.mark.parametrize("checkpoint, method, init, lr, completion", [
    ("small_checkpoint", "prompt_tuning", "text", 0.2, " yes"),
    ("tiny_checkpoint", "prefix_tuning", "random", 0.3, " the fleet sails"),
])
def test_learnable_task_halves_the_loss_and_exports_what_it_trained(request, tmp_path, checkpoint, method, init,
                                                                    lr, completion):
    ckpt = request.getfixturevalue(checkpoint)
    tok = load_tokenizer(ckpt)
    examples = parse_dataset(learnable_jsonl(completion=completion), tokenizer=tok, max_example_tokens=64,
                             max_examples=1000)
    steps = 20
    cfg = TrainConfig(model_path=str(ckpt), method=method, num_virtual_tokens=8, epochs=100,
                      learning_rate=lr, batch_size=4, max_steps=steps, seed=7, init=init, init_text="Answer:")
    seen = []
    result = train(cfg, examples, progress=lambda s, t, loss: seen.append((s, t, loss)), keep_model=True)
    m = result.metrics
    assert [s for s, _, _ in seen] == list(range(1, steps + 1)) and all(t == steps for _, t, _ in seen)
    assert len(m["loss"]) == steps and m["initial_loss"] == seen[0][2] == pytest.approx(m["loss"][0], abs=1e-5)
    assert m["final_loss"] <= 0.5 * m["initial_loss"], m
    assert m["examples_per_s"] > 0 and m["tokens_per_s"] > m["examples_per_s"]
    # the export is exactly what save_pretrained writes, and our engine's parser accepts it
    peft_type = "PROMPT_TUNING" if method == "prompt_tuning" else "PREFIX_TUNING"
    assert result.adapter_config["peft_type"] == peft_type and result.adapter_config["num_virtual_tokens"] == 8
    weights = parse_adapter_files(json.dumps(result.adapter_config).encode(), result.safetensors_bytes)
    backbone = ModelConfig.from_pretrained(ckpt)
    width = backbone.n_embd if method == "prompt_tuning" else 2 * backbone.n_layer * backbone.n_embd
    assert tuple(weights.prompt_embeddings.shape) == (8, width)
    # PeftModel.from_pretrained on the exported files == the in-memory trained model
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(result.adapter_config))
    (out / "adapter_model.safetensors").write_bytes(result.safetensors_bytes)
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt), str(out)).eval()
    trained = result.model.eval()
    for prompt in ["apple stone:", "quiet north lamp:", "something else entirely"]:
        assert greedy(loaded, tok, prompt) == greedy(trained, tok, prompt)


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_checkpoint, examples):
    def run(seed: int, init: str = "random_vocab") -> bytes:
        cfg = TrainConfig(model_path=str(tiny_checkpoint), num_virtual_tokens=4, epochs=1, batch_size=4,
                          max_steps=3, seed=seed, init=init, learning_rate=0.05)
        return train(cfg, examples).safetensors_bytes

    first = run(11)
    assert run(11) == first
    assert run(12) != first
    assert run(11, "random") != first


def test_cancel_stops_before_the_next_step(tiny_checkpoint, examples):
    steps = []
    cfg = TrainConfig(model_path=str(tiny_checkpoint), num_virtual_tokens=4, epochs=10, batch_size=4, seed=1)
    with pytest.raises(TrainingCancelled):
        train(cfg, examples, progress=lambda s, t, loss: steps.append(s), should_cancel=lambda: len(steps) >= 3)
    assert steps == [1, 2, 3]


def test_text_init_needs_text(tiny_checkpoint, examples):
    with pytest.raises(ValueError, match="init_text"):
        train(TrainConfig(model_path=str(tiny_checkpoint), init="text", init_text=None), examples)
