"""The engine's KV cache: one slot per running sequence, slots kept compact (rows
0..B-1 of the running batch are slots 0..B-1), so a decode step reads the batch's keys
as one strided view with no gather.

Layout per layer, for every backend: ``[slots, max_len + pad, kv_heads, head_dim]`` (the
key/value heads: fewer than the query heads under grouped-query attention), so one
token's keys for all heads are one contiguous row: a decode step writes B rows of
``heads * head_dim`` (not B * heads scattered ones) and SDPA reads ``[B, H, T, D]`` as a
strided view. ``pad`` is 1 for SDPA (position ``max_len`` is a scratch row that padded
prefill tokens write into) and 0 for flash-attn: its groups are rectangles (``plan_step``
merges only equal-length prompt chunks, decode rows carry one token; ``SlotBatch``
asserts it), so no token is ever appended past a row's end.

Capacity follows the budget (``SlotKVCache.for_budget``): as many slots of ``max_len``
positions as ``kv_cache_bytes`` holds, up to ``max_batch_size``, pad included, so what is
allocated (physical memory on CUDA) never exceeds the budget (``allocated_bytes``, which
/metrics reports beside the budget); when the budget holds less than one full-length
sequence, one shorter slot. The scheduler admits into free slots, and
a request longer than a slot is refused. (A slot is sized for the longest sequence, so a
short request holds a whole slot: a paged layout would pack more short requests into the
same budget, at the price of a gather for every SDPA read.)

Attention backends (``attention_backend.choose_attention``): ``flash`` (flash-attn, CUDA
fp16/bf16), ``sdpa`` (torch SDPA), ``flex`` (SDPA for prompt chunks, FlexAttention for
decode groups: ``flex_decode``), and ``avx512`` on CPU (fp32; bf16 where the CPU has AVX512-BF16):
SDPA for prompt chunks, and decode groups (one new token per row) through
``native_kernels``' decode attention, which reads each row's keys and values front to
back once (faster than SDPA at decode: README, Benchmarks: "Figures behind the kernel choices"), grouped-query heads included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from promptfleet.platform.adapter import AdapterPrefix
from promptfleet.platform.attention_backend import ATTENTION, resolve_attention
from promptfleet.platform.config import ModelConfig
from promptfleet.platform.flex_decode import FLEX_BLOCK, FlexDecode
from promptfleet.platform.native_kernels import NativeKernels, native_kernels
from promptfleet.platform.staging import StepStaging

__all__ = ["ATTENTION", "SlotBatch", "SlotKVCache", "StepBatch", "resolve_attention", "token_bytes"]


def token_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    return 2 * cfg.n_layer * cfg.kv_dim * torch.empty(0, dtype=dtype).element_size()


class SlotKVCache:
    def __init__(self, cfg: ModelConfig, *, max_slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, backend: str) -> None:
        self.cfg, self.max_slots, self.max_len, self.backend = cfg, max_slots, max_len, backend
        # decode groups go through the native kernel (avx512) or FlexAttention (flex);
        # everything else as with sdpa
        self.decode_kernels: NativeKernels | None = native_kernels() if backend == "avx512" else None
        self.flex: FlexDecode | None = FlexDecode() if backend == "flex" else None
        h, d = cfg.n_kv_head, cfg.head_dim
        shape = (max_slots, max_len + self.pad_for(backend), h, d)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        # Positions below initialized[slot] hold finite data. A batch reads keys up to its
        # longest row, and a masked key still multiplies its value by 0 (0 * NaN = NaN), so
        # never-written memory is zeroed once, the first time a read reaches it.
        self.initialized = [0] * max_slots

    @staticmethod
    def pad_for(backend: str) -> int:
        """Positions past ``max_len`` per slot: SDPA's scratch row for right-padded prompt
        tokens; none for flash-attn, whose groups are rectangles (``SlotBatch`` asserts it:
        flash-attn appends every new token at ``cache_seqlens``, so a padded one would land
        past the row's end)."""
        return 0 if backend == "flash" else 1

    @classmethod
    def for_budget(cls, cfg: ModelConfig, *, budget_bytes: int, max_slots: int, max_len: int, device: torch.device,
                   dtype: torch.dtype, backend: str) -> "SlotKVCache":
        """As many slots of ``max_len`` positions (pad included) as ``budget_bytes`` holds, at
        most ``max_slots``; one slot of what the budget holds when that is less than one."""
        per_token, pad = token_bytes(cfg, dtype), cls.pad_for(backend)
        slots = min(max_slots, budget_bytes // ((max_len + pad) * per_token))
        if slots < 1:  # one slot of what the budget holds
            slots, max_len = 1, budget_bytes // per_token - pad
            if max_len < 2:
                raise ValueError(f"kv_cache_bytes {budget_bytes} holds no sequence: one token's keys and values "
                                 f"take {per_token} bytes over all layers (+{pad} positions of pad per slot)")
        return cls(cfg, max_slots=slots, max_len=max_len, device=device, dtype=dtype, backend=backend)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def ensure_initialized(self, slot0: int, count: int, upto: int) -> None:
        if self.backend == "flash":
            return  # flash-attn reads only each row's own keys
        chunk = FLEX_BLOCK if self.backend == "flex" else 64  # flex reads a row's last block whole
        upto = min(-(-upto // chunk) * chunk, self.max_len + self.pad_for(self.backend))
        for slot in range(slot0, slot0 + count):
            lo = self.initialized[slot]
            if lo < upto:
                for layer in range(self.cfg.n_layer):
                    self.k[layer][slot, lo:upto].zero_()
                    self.v[layer][slot, lo:upto].zero_()
                self.initialized[slot] = upto

    def forget(self, slot: int) -> None:
        """Treat ``slot`` as never written (it may hold a failed sequence's NaN/Inf): the
        next read past what its next owner wrote zeroes it again (see ``initialized``)."""
        self.initialized[slot] = 0

    @property
    def bytes_per_token(self) -> int:
        return token_bytes(self.cfg, self.k[0].dtype)

    def copy_prefix(self, slot: int, prefix: AdapterPrefix) -> None:
        """Put an adapter's shared virtual-token K/V (``[n_layer, H_kv, n, D]``) at positions
        0..n-1 of ``slot``."""
        n = prefix.num_virtual_tokens
        self.initialized[slot] = max(self.initialized[slot], n)
        for layer in range(self.cfg.n_layer):
            pk, pv = prefix.k[layer], prefix.v[layer]  # [H_kv, n, D]
            self.k[layer][slot, :n].copy_(pk.transpose(0, 1))
            self.v[layer][slot, :n].copy_(pv.transpose(0, 1))

    def move(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Copy cached positions ``start .. length-1`` of slot ``src`` into slot ``dst`` (a
        beam's slot holds its own tokens from ``start``: the prompt's are its head's)."""
        if length <= start:
            return
        for layer in range(self.cfg.n_layer):
            for t in (self.k[layer], self.v[layer]):
                t[dst, start:length].copy_(t[src, start:length])
        self.mark_written(dst, start, length)

    def mark_written(self, slot: int, start: int, end: int) -> None:
        """Positions ``start .. end-1`` of ``slot`` now hold finite data: ``initialized``
        grows only when that range joins the finite positions below it (a gap stays
        unknown, and is zeroed before anyone reads it)."""
        if self.initialized[slot] >= start:
            self.initialized[slot] = max(self.initialized[slot], end)


class SlotBatch:
    """Attention context for rows ``slot0 .. slot0+B-1``: row b already has ``start[b]``
    cached tokens and brings ``q_lens[b]`` new ones (right-padded to ``T``).

    Its index tensors are built on the host and registered with ``stage`` (the step's
    ``StepStaging``, which moves every group's in one copy); without one they are moved
    at once. The attention mask is computed on the device from them, on first use."""

    def __init__(self, cache: SlotKVCache, slot0: int, start: list[int], q_lens: list[int], T: int,
                 stage: StepStaging | None = None) -> None:
        self.cache, self.slot0, self.B, self.T = cache, slot0, len(start), T
        if cache.backend == "flash" and any(q != T for q in q_lens):
            raise AssertionError(f"a flash-attn group must be a rectangle (rows of {T} new tokens, got {q_lens}): "
                                 "flash-attn would append a padded token past its row's end")
        # a decode group on the native kernel: row b stores its token at start[b] and
        # attends to its first start[b] + 1 keys (it reads nothing past them: no mask, no
        # zeroing, and none of the index tensors below)
        self.native_lens = (torch.tensor(start, dtype=torch.int32) + 1
                            if cache.decode_kernels is not None and T == 1 else None)
        if self.native_lens is not None:
            return
        own = stage is None
        stage = stage or StepStaging(cache.k[0].device)
        start_h = torch.tensor(start, dtype=torch.long)
        rows_h = torch.arange(slot0, slot0 + self.B)
        self._mask = self._lens = None
        self.flex_decode = self._needs_mask = False
        self.tk = max(s + q for s, q in zip(start, q_lens))
        if cache.backend == "flash":
            self._start, self._rows = stage.add(start_h.to(torch.int32)), stage.add(rows_h.to(torch.int32))
        else:
            steps = torch.arange(T)
            pos = start_h[:, None] + steps[None, :]
            if any(q != T for q in q_lens):
                padded = steps[None, :] >= torch.tensor(q_lens)[:, None]
                pos = torch.where(padded, torch.full_like(pos, cache.max_len), pos)
            # row (slot, pos) of a layer's cache viewed as [slots * positions, H * D]
            self._flat = stage.add((rows_h[:, None] * cache.k[0].shape[1] + pos).reshape(-1))
            self._start = stage.add(start_h)
            cache.ensure_initialized(slot0, self.B, self.tk)
            self.flex_decode = cache.flex is not None and T == 1
            self._needs_mask = not (T == 1 and min(start) == max(start)) and not self.flex_decode
        if own:
            stage.flush()

    @property
    def mask(self) -> torch.Tensor | None:
        """``[B, 1, T, tk]``: key j visible to new token i of row b (None: every row sees all its keys)."""
        if self._mask is None and self._needs_mask:
            start = self._start.get()
            steps = torch.arange(self.T, device=start.device)
            keys = torch.arange(self.tk, device=start.device)
            self._mask = (keys[None, None, :] <= (start[:, None, None] + steps[None, :, None]))[:, None]
        return self._mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        if c.backend == "flash":
            return self._flash(layer, q, k, v)
        kc, vc = c.k[layer], c.v[layer]
        if self.native_lens is not None:
            heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
            out = c.decode_kernels.decode_attention(q.reshape(self.B, heads, dim), kc, vc, self.slot0, self.native_lens,
                                                    k_new=k.reshape(self.B, kv_heads, dim),
                                                    v_new=v.reshape(self.B, kv_heads, dim))
            return out.reshape(self.B, 1, heads, dim)
        # one index_copy_ of B*T token rows into the flat [slots*positions, H*D] view
        # (much cheaper than advanced-index assignment)
        n, width = k.shape[0] * k.shape[1], k.shape[2] * k.shape[3]
        flat = self._flat.get()
        kc.view(-1, width).index_copy_(0, flat, k.reshape(n, width))
        vc.view(-1, width).index_copy_(0, flat, v.reshape(n, width))
        if self.flex_decode:
            if self._lens is None:
                self._lens = (self._start.get() + 1).to(torch.int32)
            heads, dim = q.shape[2], q.shape[3]
            return c.flex.decode(q.reshape(self.B, heads, dim), kc, vc, self.slot0, self._lens).reshape(q.shape)
        s0, s1 = self.slot0, self.slot0 + self.B
        keys, values = kc[s0:s1, : self.tk].transpose(1, 2), vc[s0:s1, : self.tk].transpose(1, 2)
        q = q.transpose(1, 2)
        gqa = q.shape[1] != keys.shape[1]  # grouped-query attention: SDPA shares each KV head
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # torch's CPU flash kernel is several times slower in bf16 than in fp32, upcasting
            # included (README, Benchmarks): read the bf16 cache, attend in fp32
            out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=self.mask,
                                                 scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=gqa).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask,
                                                 scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=gqa)
        return out.transpose(1, 2)

    def _flash(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # flash-attn appends k/v at cache_seqlens (the group is a rectangle: every row's
        # new tokens are real) and aligns the causal mask to the end of the keys; the
        # indices are int32 on the cache's device, staged once per step, not cast per layer
        from flash_attn import flash_attn_with_kvcache

        c = self.cache
        return flash_attn_with_kvcache(q, c.k[layer], c.v[layer], k=k, v=v, cache_seqlens=self._start.get(),
                                       cache_batch_idx=self._rows.get(), causal=True)


class StepBatch:
    """Attention context for several ``SlotBatch`` groups whose tokens are laid one
    after another into a single ``[1, N]`` forward, e.g. the running sequences' decode
    tokens and the prompts admitted this step: the linears (most of a step's cost, bound
    by reading the weights) see one matrix of all N tokens; attention runs per group."""

    def __init__(self, groups: list) -> None:  # SlotBatch, or beam_attention.BeamBatch (same B, T, attend)
        self.groups = groups
        self.sizes = [g.B * g.T for g in groups]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
        if len(self.groups) == 1:  # a decode-only step: nothing to split or join
            g = self.groups[0]
            shape, kv_shape = (g.B, g.T, heads, dim), (g.B, g.T, kv_heads, dim)
            return g.attend(layer, q.view(shape), k.view(kv_shape), v.view(kv_shape)).reshape(1, g.B * g.T, heads, dim)
        outs = []
        for g, qs, ks, vs in zip(self.groups, q.split(self.sizes, 1), k.split(self.sizes, 1), v.split(self.sizes, 1)):
            shape, kv_shape = (g.B, g.T, heads, dim), (g.B, g.T, kv_heads, dim)
            out = g.attend(layer, qs.reshape(shape), ks.reshape(kv_shape), vs.reshape(kv_shape))
            outs.append(out.reshape(1, g.B * g.T, heads, dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
