"""Helpers shared by the test suites, benchmarks and demo: PEFT adapters made by PEFT
itself, and PEFT's own greedy generation as the reference our engine must match."""
from __future__ import annotations

from pathlib import Path

import torch


def make_peft_adapter(checkpoint: Path, out: Path, method: str, n_virtual: int, seed: int) -> Path:
    """Build a PEFT adapter of ``method`` (prompt_tuning, p_tuning, prefix_tuning) with
    seeded non-trivial weights and ``save_pretrained`` it to ``out``."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint)  # GPT-2 or Llama family
    if method == "prompt_tuning":
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    elif method == "p_tuning":
        cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual, encoder_hidden_size=64)
    elif method == "prefix_tuning":
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    else:
        raise ValueError(f"unknown method {method!r}")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()
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


def wait_for(predicate, *, timeout: float, interval: float = 0.1, what: str = "condition", on_timeout=None):
    """Poll ``predicate`` until it returns something truthy (returned), at most ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{extra}")
        time.sleep(interval)


def tar_gz_with(files: dict[str, bytes], special=()) -> bytes:
    """A tar.gz of ``files`` plus ``special`` members (links, devices: see ``tar_link``),
    for the hostile-archive tests."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special:
            tf.addfile(info)
    return buf.getvalue()


def tar_link(name: str, kind: bytes, target: str = "", **attrs):
    """A tar member of type ``kind`` (``tarfile.SYMTYPE``, ``LNKTYPE``, ``CHRTYPE``, ...)."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def api_error(response, status: int, code: str | None = None, *, type: str | None = None) -> dict:
    """Assert ``response`` is an OpenAI-shaped error (``{"error": {message, type, code}}``)
    with this status (and code / type when given); returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    err = body["error"]
    assert err["message"] and err["type"], err
    if type is not None:
        assert err["type"] == type, err
    if code is not None:
        assert err["code"] == code, err
    return err
