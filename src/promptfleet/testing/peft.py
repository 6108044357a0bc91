"""PEFT adapters made by PEFT itself, and PEFT's own greedy generation as the reference
the engine must match (tests, benchmarks and the demo use these)."""
from __future__ import annotations

from pathlib import Path

import torch

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "lora")


def make_peft_adapter(checkpoint: Path, out: Path, method: str = "prompt_tuning", n_virtual: int = 5,
                      seed: int = 0, *, init_text: str | None = None) -> Path:
    """Build a PEFT adapter of ``method`` (prompt_tuning, p_tuning, prefix_tuning or lora)
    on ``checkpoint`` (GPT-2 or Llama family) and ``save_pretrained`` it to ``out``.

    Its trainable weights get seeded noise (std 0.5) on top of PEFT's own initialisation,
    so the adapter changes what the model says. With ``init_text`` (prompt_tuning only)
    the soft prompt is PEFT's TEXT initialisation from that text, left as it is (what a
    tenant who has not trained yet would upload)."""
    from peft import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit,
                      get_peft_model)
    from transformers import AutoModelForCausalLM

    if init_text is not None and method != "prompt_tuning":
        raise ValueError("init_text is for prompt_tuning only")
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    if method == "prompt_tuning" and init_text is not None:
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual,
                                 prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init_text,
                                 tokenizer_name_or_path=str(checkpoint))
    elif method == "prompt_tuning":
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    elif method == "p_tuning":
        cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual, encoder_hidden_size=64)
    elif method == "prefix_tuning":
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    elif method == "lora":
        cfg = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"])
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    model = get_peft_model(base, cfg)
    if init_text is None:
        params = ([p for p in model.parameters() if p.requires_grad] if method == "lora"
                  else list(model.prompt_encoder.parameters()))
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


def greedy_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy tokens from ``model``'s full forward on the whole sequence at every step
    (no cache); stops after EOS."""
    seq, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([seq])
            token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
            if token == eos_token_id:
                break
    return out


def reference_beams(model, prompt_ids: list[int], *, num_beams: int, num_return: int, max_new_tokens: int,
                    eos_token_ids: list[int], length_penalty: float = 1.0, early_stopping: bool | str = False,
                    repetition_penalty: float = 1.0) -> list[tuple[list[int], bool]]:
    """transformers' own beam search (``generate(num_beams=k)``, greedy, no cache: for a
    PeftModel that is its prompt-learning forward on the whole sequence at every step,
    the path that is right for prompt and prefix tuning on GPT-2, and for prompt tuning
    on Llama): the ``num_return`` best beams, each as ``(ids without the EOS, ended on EOS)``."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             num_beams=num_beams, num_return_sequences=num_return, do_sample=False,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             repetition_penalty=repetition_penalty, eos_token_id=eos_token_ids,
                             pad_token_id=eos_token_ids[0], use_cache=False)
    beams = []
    for row in out[:, len(prompt_ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in eos_token_ids), None)
        beams.append((row, False) if end is None else (row[:end], True))
    return beams


def load_reference_model(checkpoint: Path, adapter_dir: Path | None):
    """transformers' model on ``checkpoint``, wrapped by PEFT with ``adapter_dir`` if given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_greedy(checkpoint: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
                eos_token_id: int = 50256) -> list[int]:
    """The reference: PeftModel's (or plain transformers') own forward on the whole
    sequence at every step, greedy, on this request alone; stops after EOS.

    Not ``PeftModel.generate``: with transformers 5.24 + peft 0.21 its cached path
    re-prepends the soft prompt at every decode step for PROMPT_TUNING/P_TUNING (seen by
    hooking wpe: 7 virtual + 1 real token fed per step), and even with ``use_cache=False``
    PREFIX_TUNING on a Llama reuses one prefix ``DynamicCache`` across steps, which the
    model appends each step's keys to (its length 6 -> 11 -> 17 over three steps), so its
    tokens diverge from PEFT's own forward from the second one. The full forward is the
    definition of prompt learning (what training optimises).
    """
    return greedy_ids(load_reference_model(checkpoint, adapter_dir), prompt_ids, max_new_tokens, eos_token_id)


class PeftReference:
    """``peft_greedy`` for a running server's answers: ``(text, finish_reason)`` of a greedy
    request, the models loaded once per adapter and answers memoised."""

    def __init__(self, checkpoint: Path, eos_token_id: int = 50256) -> None:
        from promptfleet.platform.tokenizer import load_tokenizer

        self.checkpoint = checkpoint
        self.eos = eos_token_id
        self.tokenizer = load_tokenizer(checkpoint)
        self._models: dict[str | None, object] = {}
        self._answers: dict[tuple[str | None, str, int], tuple[str, str]] = {}

    def ids(self, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
        key = None if adapter_dir is None else str(adapter_dir)
        if key not in self._models:
            self._models[key] = load_reference_model(self.checkpoint, adapter_dir)
        return greedy_ids(self._models[key], self.tokenizer.encode(prompt), max_new_tokens, self.eos)

    def answer(self, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> tuple[str, str]:
        """``(text, finish_reason)`` the server must answer for this greedy request."""
        key = (None if adapter_dir is None else str(adapter_dir), prompt, max_new_tokens)
        if key not in self._answers:
            ids = self.ids(adapter_dir, prompt, max_new_tokens)
            finish = "length"
            if self.eos in ids:
                ids, finish = ids[:ids.index(self.eos)], "stop"
            self._answers[key] = (self.tokenizer.decode(ids), finish)
        return self._answers[key]
