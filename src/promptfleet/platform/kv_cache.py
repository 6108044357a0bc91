"""The engine's KV cache: one slot per running sequence, slots kept compact (rows
0..B-1 of the running batch are slots 0..B-1), so a decode step reads the batch's keys
as one strided view with no gather.

Layout per layer, for both backends: ``[slots, max_len + pad, kv_heads, head_dim]`` (the
key/value heads: fewer than the query heads under grouped-query attention), so one
token's keys for all heads are one contiguous row: a decode step writes B rows of
``heads * head_dim`` (not B * heads scattered ones) and SDPA reads ``[B, H, T, D]`` as a
strided view. ``pad`` is 1 for SDPA (position ``max_len`` is a scratch row that padded
prefill tokens write into) and, for flash-attn, which appends padded prompt tokens past
each row's end, the widest prompt chunk a step carries (``max_step_tokens``).

Capacity follows the budget (``SlotKVCache.for_budget``): as many slots of ``max_len``
positions as ``kv_cache_bytes`` holds, up to ``max_batch_size``, pad included, so what is
allocated (physical memory on CUDA) never exceeds the budget; when the budget holds less
than one full-length sequence, one shorter slot. The scheduler admits into free slots, and
a request longer than a slot is refused. (A slot is sized for the longest sequence, so a
short request holds a whole slot: a paged layout would pack more short requests into the
same budget, at the price of a gather for every SDPA read.)

Attention backends (``resolve_attention``): ``flash`` (flash-attn, CUDA fp16/bf16),
``sdpa`` (torch SDPA), and ``avx512`` on CPU (fp32; bf16 where the CPU has AVX512-BF16):
SDPA for prompt chunks, and decode groups (one new token per row) through
``native_kernels``' decode attention, which reads each row's keys and values front to
back once (faster than SDPA at decode: README, Benchmarks: "Figures behind the kernel choices"), grouped-query heads included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from promptfleet.platform.adapter import AdapterPrefix
from promptfleet.platform.config import ModelConfig
from promptfleet.platform.native_kernels import NativeKernels, kernel_support, native_kernels

ATTENTION = ("auto", "sdpa", "flash", "avx512")


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_available(device: torch.device) -> bool:
    return device.type == "cuda" and _flash_attn_importable()


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                      family: str = "gpt2") -> str:
    """``auto`` -> ``flash`` on CUDA in fp16/bf16 with flash-attn installed, ``avx512`` on
    CPU where the native kernels run for the dtype, else ``sdpa``. Asking for one that
    cannot run here is an error that says why."""
    if name not in ATTENTION:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(ATTENTION)}")
    if name == "auto" and flash_attn_available(device) and dtype != torch.float32:
        return "flash"
    if name == "flash":
        if not _flash_attn_importable():
            raise ValueError("flash attention needs the flash-attn package (pip install 'promptfleet[gpu]', CUDA)")
        return "flash"
    if name in ("auto", "avx512"):
        reason = f"head_dim {head_dim} is not a multiple of 16" if head_dim % 16 else kernel_support(device, dtype).reason
        if reason is None:
            return "avx512"
        if name == "avx512":
            raise ValueError(f"the avx512 attention kernel cannot run here: {reason}")
    return "sdpa"


def token_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    return 2 * cfg.n_layer * cfg.kv_dim * torch.empty(0, dtype=dtype).element_size()


class SlotKVCache:
    def __init__(self, cfg: ModelConfig, *, max_slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, backend: str, prefill_pad: int = 0) -> None:
        self.cfg, self.max_slots, self.max_len, self.backend = cfg, max_slots, max_len, backend
        # decode groups go through the native kernel; everything else as with sdpa
        self.decode_kernels: NativeKernels | None = native_kernels() if backend == "avx512" else None
        h, d = cfg.n_kv_head, cfg.head_dim
        shape = (max_slots, max_len + self.pad_for(backend, prefill_pad), h, d)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        # Positions below initialized[slot] hold finite data. A batch reads keys up to its
        # longest row, and a masked key still multiplies its value by 0 (0 * NaN = NaN), so
        # never-written memory is zeroed once, the first time a read reaches it.
        self.initialized = [0] * max_slots

    @staticmethod
    def pad_for(backend: str, prefill_pad: int) -> int:
        return prefill_pad if backend == "flash" else 1

    @classmethod
    def for_budget(cls, cfg: ModelConfig, *, budget_bytes: int, max_slots: int, max_len: int, device: torch.device,
                   dtype: torch.dtype, backend: str, prefill_pad: int = 0) -> "SlotKVCache":
        """As many slots of ``max_len`` positions (pad included) as ``budget_bytes`` holds, at
        most ``max_slots``; one slot of what the budget holds when that is less than one."""
        per_token, pad = token_bytes(cfg, dtype), cls.pad_for(backend, prefill_pad)
        slots = min(max_slots, budget_bytes // ((max_len + pad) * per_token))
        if slots < 1:  # one slot of what the budget holds (flash's pad at most its length)
            total = budget_bytes // per_token
            slots, max_len = 1, total - pad if total >= 2 * pad else total // 2
            prefill_pad = min(prefill_pad, max_len)
            if max_len < 2:
                raise ValueError(f"kv_cache_bytes {budget_bytes} holds no sequence: one token's keys and values "
                                 f"take {per_token} bytes over all layers (+{pad} positions of pad per slot)")
        return cls(cfg, max_slots=slots, max_len=max_len, device=device, dtype=dtype, backend=backend,
                   prefill_pad=prefill_pad)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def ensure_initialized(self, slot0: int, count: int, upto: int) -> None:
        if self.backend == "flash":
            return  # flash-attn reads only each row's own keys
        upto = min(-(-upto // 64) * 64, self.max_len + 1)  # in chunks of 64 positions
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
    cached tokens and brings ``q_lens[b]`` new ones (right-padded to ``T``)."""

    def __init__(self, cache: SlotKVCache, slot0: int, start: list[int], q_lens: list[int], T: int) -> None:
        self.cache, self.slot0, self.B, self.T = cache, slot0, len(start), T
        # a decode group on the native kernel: row b stores its token at start[b] and
        # attends to its first start[b] + 1 keys (it reads nothing past them: no mask, no
        # zeroing, and none of the index tensors below)
        self.native_lens = (torch.tensor(start, dtype=torch.int32) + 1
                            if cache.decode_kernels is not None and T == 1 else None)
        if self.native_lens is not None:
            return
        dev = cache.k[0].device
        self.start_t = torch.tensor(start, dtype=torch.long, device=dev)
        self.rows = torch.arange(slot0, slot0 + self.B, device=dev)
        if cache.backend == "flash":
            return
        steps = torch.arange(T, device=dev)
        pos = self.start_t[:, None] + steps[None, :]
        if any(q != T for q in q_lens):
            valid = steps[None, :] < torch.tensor(q_lens, device=dev)[:, None]
            pos = torch.where(valid, pos, torch.full_like(pos, cache.max_len))
        # row (slot, pos) of a layer's cache viewed as [slots * positions, H * D]
        self.flat_index = (self.rows[:, None] * cache.k[0].shape[1] + pos).reshape(-1)
        self.tk = max(s + q for s, q in zip(start, q_lens))
        cache.ensure_initialized(slot0, self.B, self.tk)
        if T == 1 and min(start) == max(start):
            self.mask = None  # every row sees all of its keys
        else:
            keys = torch.arange(self.tk, device=dev)
            self.mask = (keys[None, None, :] <= (self.start_t[:, None, None] + steps[None, :, None]))[:, None]

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
        kc.view(-1, width).index_copy_(0, self.flat_index, k.reshape(n, width))
        vc.view(-1, width).index_copy_(0, self.flat_index, v.reshape(n, width))
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
        # flash-attn appends k/v at cache_seqlens (padded tokens land past each row's
        # end, in the pad margin) and aligns the causal mask to the end of the keys.
        from flash_attn import flash_attn_with_kvcache

        c = self.cache
        return flash_attn_with_kvcache(
            q, c.k[layer], c.v[layer], k=k, v=v,
            cache_seqlens=self.start_t.to(torch.int32), cache_batch_idx=self.rows.to(torch.int32),
            causal=True,
        )


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
