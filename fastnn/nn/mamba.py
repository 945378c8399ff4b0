"""Mamba block, drop-in for ``mamba_ssm.Mamba`` (mamba_simple): same arguments, initialisation and parameter
names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so a mamba_ssm state_dict loads unchanged.

The forward runs fastnn's causal_conv1d_fn and selective_scan_fn (C++ on the CPU, Triton / CUDA C++ on the
GPU); decoding runs causal_conv1d_update and selective_state_update on an inference cache."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


@dataclass
class InferenceParams:
    """Decoding state shared by the layers of a model, as mamba_ssm.utils.generation.InferenceParams:
    key_value_memory_dict maps layer_idx -> (conv_state, ssm_state); increase seqlen_offset after each
    step (0 means the next forward is a prefill)."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new generation: new sizes, offset 0, the cached states zeroed."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()
        for states in self.key_value_memory_dict.values():
            for s in states:
                s.zero_()


def _as_int(v):
    """An integral non-bool number (numpy's included) as a Python int; anything else unchanged (the checks
    then name it)."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def _as_real(v):
    """A real non-bool number (numpy's included) as a Python int / float; anything else unchanged."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return v
    return int(v) if isinstance(v, numbers.Integral) else float(v)


class Mamba(nn.Module):
    """The Mamba (S6) block of Gu & Dao: in_proj -> causal depthwise conv + silu -> selective scan gated by
    silu(z) -> out_proj, over (B, L, d_model).

    Args: as mamba_ssm.Mamba. d_inner = expand * d_model; dt_rank "auto" is ceil(d_model / 16). A_log is
    initialised to log(1..d_state) (S4D-real), D to ones, and dt_proj's bias so that softplus(bias) is
    log-uniform in [dt_min, dt_max] (floored at dt_init_floor). use_fast_path is accepted for
    compatibility: every path here runs the fused kernels.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, layer_idx: Optional[int] = None, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        # integers of any kind (numpy's too, as mamba_ssm takes them) as Python ints; reals likewise
        d_model, d_state, d_conv, dt_rank = (_as_int(v) for v in (d_model, d_state, d_conv, dt_rank))
        expand, dt_min, dt_max, dt_scale, dt_init_floor = (_as_real(v) for v in (expand, dt_min, dt_max, dt_scale,
                                                                                 dt_init_floor))
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int; got {d_model!r}")
        if isinstance(d_state, bool) or not isinstance(d_state, int) or not 1 <= d_state <= 256:
            raise ValueError(f"d_state must be an int in 1..256; got {d_state!r}")
        if isinstance(d_conv, bool) or not isinstance(d_conv, int) or not 2 <= d_conv <= 4:
            raise ValueError(f"d_conv must be 2, 3 or 4 (the causal conv kernels' widths); got {d_conv!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant'; got {dt_init!r}")
        if (isinstance(expand, bool) or not isinstance(expand, (int, float)) or not math.isfinite(expand)
                or not int(expand * d_model) >= 1):
            raise ValueError(f"expand must be a positive number with expand * d_model >= 1; got {expand!r}")
        if dt_rank != "auto" and (isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank <= 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int; got {dt_rank!r}")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max
                and math.isfinite(dt_max)):
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max < inf; got {dt_min!r}, {dt_max!r}")
        # (the random init draws uniform(-s, s) with s = dt_scale / sqrt(dt_rank): s must be a real >= 0)
        if (isinstance(dt_scale, bool) or not isinstance(dt_scale, (int, float)) or not math.isfinite(dt_scale)
                or (dt_init == "random" and dt_scale < 0)):
            raise ValueError(f"dt_scale must be a finite number (>= 0 with dt_init='random'); got {dt_scale!r}")
        if isinstance(dt_init_floor, bool) or not isinstance(dt_init_floor, (int, float)) or not math.isfinite(
                dt_init_floor):
            raise ValueError(f"dt_init_floor must be a finite number; got {dt_init_floor!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self.act = nn.SiLU()

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weight keeps the variance of dt at initialisation; bias = softplus^-1 of a log-uniform dt.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            dt = torch.exp(torch.rand(self.d_inner, device=device, dtype=torch.float32)
                           * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real A = -(1..N) per channel, kept as log and in fp32 (as mamba_ssm).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
                f"d_inner={self.d_inner}, dt_rank={self.dt_rank}, layer_idx={self.layer_idx}")

    # ------------------------------------------------------------ full sequence

    def forward(self, hidden_states: Tensor, inference_params: Optional[InferenceParams] = None, *,
                seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """(B, L, d_model) -> (B, L, d_model).

        inference_params: decoding cache. At seqlen_offset 0 this is a prefill that also fills the layer's
        (conv_state, ssm_state); after that each call is one decode step over (B, 1, d_model).
        seq_idx (B, L) int32 / cu_seqlens (S + 1,): packed variable-length sequences (B = 1 with
        cu_seqlens); neither the convolution nor the scan crosses a sequence boundary.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states must be (B, L, d_model={self.d_model}); got "
                             f"{tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        if inference_params is not None:
            if seq_idx is not None or cu_seqlens is not None:
                raise ValueError("packed sequences (seq_idx / cu_seqlens) cannot be decoded with inference_params")
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out
        conv_seq_idx = seq_idx
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"with cu_seqlens the sequences are packed along L and the batch must be 1; got {batch}")
            ops.ssm.check_cu_seqlens(cu_seqlens, seqlen, "hidden_states", hidden_states)
            conv_seq_idx = ops.ssm.cu_seqlens_to_seq_idx(cu_seqlens, seqlen)

        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        if conv_state is not None:  # the last d_conv inputs of the conv (zeros before the start)
            conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)))
        x = ops.causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=conv_seq_idx,
                                 activation=self.activation)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L); the bias goes to the scan
        A = -torch.exp(self.A_log.float())
        y = ops.selective_scan_fn(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                                  delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                                  return_last_state=ssm_state is not None, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    # ------------------------------------------------------------ decoding

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """One decode step: hidden_states (B, 1, d_model); conv_state (B, d_inner, d_conv) and ssm_state
        (B, d_inner, d_state) are updated in place. Returns (out (B, 1, d_model), conv_state, ssm_state)."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"step decodes one token at a time: hidden_states must be (B, 1, d_model); got "
                             f"{tuple(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        for name, state, width in (("conv_state", conv_state, self.d_conv), ("ssm_state", ssm_state, self.d_state)):
            if not isinstance(state, Tensor) or tuple(state.shape) != (batch, self.d_inner, width):
                got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
                raise ValueError(f"{name} must be (B, d_inner, {'d_conv' if width == self.d_conv else 'd_state'}) = "
                                 f"({batch}, {self.d_inner}, {width}); got {got}")
        xz = self.in_proj(hidden_states.squeeze(1))
        x, z = xz.chunk(2, dim=-1)
        x = ops.causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                     self.activation)
        x_db = self.x_proj(x)
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                       dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zeroed (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state)) for decoding."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params: InferenceParams, batch_size: int,
                               initialize_states: bool = False):
        if self.layer_idx is None:
            raise ValueError("decoding with inference_params needs the layer's layer_idx (Mamba(..., layer_idx=i))")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=self.conv1d.weight.device,
                                     dtype=self.conv1d.weight.dtype)
            ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=self.dt_proj.weight.device,
                                    dtype=self.dt_proj.weight.dtype)
            cache[self.layer_idx] = (conv_state, ssm_state)
        else:
            conv_state, ssm_state = cache[self.layer_idx]
            if conv_state.shape[0] != batch_size:  # a prefill would broadcast into every row of the cache
                raise ValueError(f"inference_params: layer {self.layer_idx}'s cache holds {conv_state.shape[0]} "
                                 f"sequences but hidden_states has batch {batch_size} (a new batch needs a new "
                                 f"InferenceParams)")
            if initialize_states:
                conv_state.zero_()
                ssm_state.zero_()
        return conv_state, ssm_state
