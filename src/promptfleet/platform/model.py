"""Our GPT-2: one readable module, nanoGPT-style, whose attention goes through a cache
context (``attend``) so the same blocks serve prefix building, prefill and decode.

Weights load from Hugging Face GPT-2 checkpoints (see ``weights.py``); the Conv1D
weights are transposed there, so every projection here is a plain ``nn.Linear``.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from promptfleet.platform.config import ModelConfig


class AttentionContext(Protocol):
    """Stores this step's keys/values for ``layer`` and returns attention output.

    q, k, v: ``[B, T, H, D]``; returns ``[B, T, H, D]``.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def activation_fn(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


def linear_plus(linear: nn.Module, inp: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(inp)``, in the linear's own kernel call where it can fuse the add
    (``native_layers.NativeLinear``)."""
    if getattr(linear, "fuses_residual", False):
        return linear(inp, residual=residual)
    return residual + linear(inp)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        d = cfg.n_embd
        self.index = index
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)
        self.act = activation_fn(cfg.activation_function)
        self.fused_activation = False  # True once c_fc applies the activation itself (linear_kernels)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(b, t, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.unbind(dim=2)
        y = ctx.attend(self.index, q, k, v).reshape(b, t, d)
        x = linear_plus(self.attn_proj, y, x)
        h = self.c_fc(self.ln_2(x))
        x = linear_plus(self.mlp_proj, h if self.fused_activation else self.act(h), x)
        return x


class GPT2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head: nn.Module | None = None  # set by linear_kernels.pack_linears
        self.linear_kernels = "torch"

    def embed(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        tok = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.to(self.wte.weight.dtype)
        return tok + self.wpe(positions)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, ctx: AttentionContext,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the final layer norm, ``[B, T, d]``."""
        return self.final_norm(self.run_blocks(self.embed(input_ids, positions, inputs_embeds), positions, ctx))

    def run_blocks(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The blocks over embeddings ``x`` (positions already added; what a decode replay records)."""
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head; logits come back in float32."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.wte.weight).float()


class DenseCache:
    """A plain growing KV cache for one batch of equal-length rows (prefix building,
    tests). Keeps every layer's keys/values as ``[B, H_kv, T, D]`` (``H_kv`` < the query
    heads under grouped-query attention); the causal mask is aligned to the end of the
    keys, as it must be when queries follow cached keys."""

    def __init__(self, n_layer: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        tq, tk = q.shape[2], k.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        gqa = q.shape[1] != k.shape[1]  # each KV head serves n_head / n_kv_head query heads
        if tq == tk:  # no cached keys: top-left and bottom-right alignment agree
            out = F.scaled_dot_product_attention(q, k, v, is_causal=tq > 1, scale=scale, enable_gqa=gqa)
        else:
            mask = None
            if tq > 1:
                mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
