"""MultiheadAttention on fastnn's fused attention: torch.nn.MultiheadAttention's arguments and state_dict."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import attention as ops_attention
from ..reference.attention import dropout_keep


def _keep_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """torch's masks say True = masked out; fastnn's bool masks say True = takes part."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return ~mask


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def _same_views(query: Tensor, key: Tensor, value: Tensor, view):
    """view() of query, key and value that keeps their identities: self-attention (one tensor three times) must
    still be recognised by _project, which then runs one in-projection GEMM instead of three, as torch does."""
    if key is value:
        if query is key:
            query = key = value = view(query)
        else:
            query, key = view(query), view(key)
            value = key
    else:
        query, key, value = view(query), view(key), view(value)
    return query, key, value


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` running fastnn's fused attention kernels.

    Same constructor (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
    batch_first, device, dtype), the same parameters and ``state_dict`` keys (a torch state_dict loads
    unchanged, and back), and the same ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)`` with torch's mask conventions (bool True
    = not allowed to attend; float masks are added).

    With ``need_weights=True`` (torch's default) the attention weights are computed explicitly, a slower path
    that materialises (N, H, L, S); pass ``need_weights=False`` for the fused kernel. Differences from torch,
    both documented: a query whose keys are all masked gets a zero output (and zero weights) where torch gives
    NaN, and training-mode dropout uses fastnn's counter-based mask, so its bits differ from torch's.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("query, key and value must all be 3-D (batched) or 2-D (unbatched); got "
                             f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        if not batched:
            query, key, value = _same_views(query, key, value, lambda t: t.unsqueeze(1))
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError("key_padding_mask must be 1-D (key length,) for unbatched input; got shape "
                                     f"{tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # work in (L, N, E), torch's internal layout
            query, key, value = _same_views(query, key, value, lambda t: t.transpose(0, 1))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if not batched:
            return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            b = self.in_proj_bias
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is value and query is key:  # self-attention: one GEMM, as torch
            return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)
        bq, bkv = (None, None) if b is None else (b[:E], b[E:])
        if key is value:
            k, v = F.linear(key, w[E:], bkv).unflatten(-1, (2, E)).unbind(-2)
            return F.linear(query, w[:E], bq), k, v
        bk, bv = (None, None) if b is None else (b[E:2 * E], b[2 * E:])
        return F.linear(query, w[:E], bq), F.linear(key, w[E:2 * E], bk), F.linear(value, w[2 * E:], bv)

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average, is_causal):
        L, N, E = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"query's embedding size must be embed_dim={self.embed_dim}; got {E}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != N:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same length and "
                             f"batch size, and the batch size of query ({N})")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise ValueError(f"key_padding_mask must have shape {(N, S)} (batch, key length); got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise TypeError(f"key_padding_mask must be bool or float; got {key_padding_mask.dtype}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask as well (torch's hint semantics); pass the causal "
                             "mask, e.g. nn.Transformer.generate_square_subsequent_mask(L)")
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask must be bool or float; got {attn_mask.dtype}")
            if attn_mask.shape not in ((L, S), (N * H, L, S)):
                raise ValueError(f"attn_mask must have shape {(L, S)} or {(N * H, L, S)}; got {tuple(attn_mask.shape)}")
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None

        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)  # (N, H, L, hd)
        k = k.reshape(k.shape[0], N, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(v.shape[0], N, H, hd).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[2]

        mask = self._merged_mask(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        if not need_weights:
            o = ops_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                          is_causal=use_causal)
            weights = None
        else:
            o, weights = self._explicit(q, k, v, mask, p)
            weights = weights.mean(dim=1) if average else weights
        o = o.permute(2, 0, 1, 3).reshape(L, N, E)
        return F.linear(o, self.out_proj.weight, self.out_proj.bias), weights

    @staticmethod
    def _merged_mask(attn_mask, key_padding_mask, N, H, L, S, dtype) -> Optional[Tensor]:
        """One mask broadcastable to (N, H, L, S) in fastnn's convention: bool (True takes part) when both
        masks are bool, else additive float (torch merges them the same way)."""
        am = None if attn_mask is None else (attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2
                                             else attn_mask.view(N, H, L, S))
        kpm = None if key_padding_mask is None else key_padding_mask.view(N, 1, 1, S)
        masks = [m for m in (am, kpm) if m is not None]
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            keep = _keep_mask(masks[0])
            return keep if len(masks) == 1 else keep & _keep_mask(masks[1])
        add = [_additive(m, dtype).to(dtype) for m in masks]  # float masks keep their dtype until here
        return add[0] if len(add) == 1 else add[0] + add[1]

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], p: float):
        """The need_weights path: scores, softmax and weights materialised, (N, H, L, S)."""
        s = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
        empty = (s == -math.inf).all(-1, keepdim=True)
        w = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        if p > 0:
            N, H, L, S = w.shape
            seed = ops_attention._draw_seed(p)  # (a tensor: under torch.vmap it may differ per entry)
            rows = (torch.arange(H, device=w.device).view(H, 1, 1) * (N * L)
                    + torch.arange(N, device=w.device).view(N, 1, 1, 1) * L + torch.arange(L, device=w.device).view(L, 1))
            w = w * dropout_keep(seed, p, rows, torch.arange(S, device=w.device)).to(w.dtype) / (1.0 - p)
        return w @ v, w
