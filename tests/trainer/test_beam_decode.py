"""The decoding search's beam search (the engine's algorithm over the trainer's model, on
its KV cache reordered to the parent beams, examples batched) equals transformers' ``generate(num_beams=k)`` on the
same PEFT model, for GPT-2 and Llama bases and each prompt-learning method."""
from __future__ import annotations

import pytest
import torch

from promptfleet.platform.beam_search import BeamParams
from promptfleet.testing.peft import reference_beams
from promptfleet.trainer.beam_decode import beam_batch

EOS = 50256


# prefix tuning on Llama has no reference: PEFT's no-cache generate grows one prefix cache
# across steps there (testing.peft.peft_greedy); its layout is the greedy decoder's, tested
# against PEFT's full forward in test_validation
CASES = [("gpt2", None), ("gpt2", "prompt_tuning"), ("gpt2", "p_tuning"), ("gpt2", "prefix_tuning"),
         ("llama", None), ("llama", "prompt_tuning"), ("llama", "p_tuning")]


@pytest.mark.parametrize("family, method", CASES)
def test_beams_equal_transformers_on_the_peft_model(request, llama_checkpoint, prompt_learning_model, family, method):
    ckpt = llama_checkpoint if family == "llama" else request.getfixturevalue("tiny_checkpoint")
    model = prompt_learning_model(ckpt, method)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (3, 8, 1, 5)]
    got = beam_batch(model, prompts, beam=BeamParams(3), max_new_tokens=6, eos_id=EOS, pad_id=EOS)
    want = []
    for p in prompts:
        [(ids, ended)] = reference_beams(model, p, num_beams=3, num_return=1, max_new_tokens=6, eos_token_ids=[EOS])
        want.append(ids + [EOS] if ended else ids)
    assert got == want
    assert len({tuple(t) for t in got}) > 1  # the prompts matter, so padding mistakes would show
