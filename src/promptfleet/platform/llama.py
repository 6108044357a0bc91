"""Our Llama: one readable module for the Llama family (Llama 2/3, SmolLM, Qwen2, Mistral
without sliding window): RMSNorm, rotary position embeddings (plain, linear or Llama-3
scaled), a SwiGLU MLP and grouped-query attention (``n_kv_head`` key/value heads shared by
``n_head`` query heads), tied or untied embeddings, optional q/k/v bias (Qwen2).

The engine sees the same interface as ``model.GPT2``: ``forward(input_ids, positions, ctx,
inputs_embeds=None)`` returns final-normed hidden states, ``logits(hidden)`` float32 logits,
``embed`` and ``config``; attention goes through ``ctx.attend(layer, q, k, v)`` with q
``[B, T, n_head, D]`` and k/v ``[B, T, n_kv_head, D]``, so caches hold only the KV heads.
Keys are cached after rotation, as in transformers.

q/k/v are one ``qkv`` linear and gate/up one ``gate_up`` linear (weights concatenated on
load, see ``weights.py``): fewer, wider matmuls, the same arithmetic per output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from promptfleet.platform.config import ModelConfig, RopeScaling
from promptfleet.platform.model import AttentionContext, linear_plus


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalised in float32 and rounded back before the weight
    (as transformers' ``LlamaRMSNorm``, so bf16 models round the same way)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float32), scaled as the checkpoint says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than the original context / low_freq_factor are slowed by
    # ``factor``, shorter than context / high_freq_factor kept, the band between blended
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, heads, D]``; the two halves of D are the pairs (transformers'
    ``rotate_half`` convention, which Hugging Face Llama checkpoints are stored for)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Rope:
    """One step's rotation: ``rope(q, k)`` returns q and k rotated by their positions."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)


class Rotary(nn.Module):
    """cos/sin of each position's angles, computed per step from the positions (no table
    sized by the context length); ``native_layers.NativeRotary`` on the native kernels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation for ``positions`` ``[B, T]``: cos/sin ``[B, T, 1, head_dim]`` in ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        return Rope(angles.cos().to(dtype), angles.sin().to(dtype))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        d, hd = cfg.n_embd, cfg.head_dim
        self.index = index
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, hd
        self.q_width, self.kv_width = cfg.n_head * hd, cfg.kv_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv = nn.Linear(d, self.q_width + 2 * self.kv_width, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_width, d, bias=cfg.attention_out_bias)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)
        self.fused_gate = False  # True once gate_up applies silu(gate) * up itself (linear_kernels)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, rope: Rope) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q, k = rope(q.view(b, t, self.n_head, self.head_dim), k.view(b, t, self.n_kv_head, self.head_dim))
        v = v.view(b, t, self.n_kv_head, self.head_dim)
        y = ctx.attend(self.index, q, k, v).reshape(b, t, self.q_width)
        x = linear_plus(self.o_proj, y, x)
        h = self.gate_up(self.mlp_norm(x))
        if not self.fused_gate:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return linear_plus(self.down, h, x)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.family != "llama":
            raise ValueError(f"Llama needs a llama-family config, got {cfg.family!r}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        # the checkpoint's own head when untied; a packed copy of either once
        # linear_kernels.pack_linears has run
        self.lm_head: nn.Module | None = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.n_embd, cfg.vocab_size, bias=False)
        self.linear_kernels = "torch"

    def embed(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
              inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (positions enter through RoPE inside attention, not here)."""
        return self.wte(input_ids) if inputs_embeds is None else inputs_embeds.to(self.wte.weight.dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, ctx: AttentionContext,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the final RMSNorm, ``[B, T, d]``."""
        return self.final_norm(self.run_blocks(self.embed(input_ids, positions, inputs_embeds), positions, ctx))

    def run_blocks(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The blocks over embeddings ``x`` at ``positions`` (what a decode replay records)."""
        rope = self.rotary(positions, x.dtype)
        for block in self.blocks:
            x = block(x, ctx, rope)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (tied to ``wte`` or the checkpoint's own); logits come back in float32."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.wte.weight).float()
