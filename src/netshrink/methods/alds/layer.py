"""`LowRankLayer`: ALDS's grouped low-rank factorisation of one Conv2d / Linear layer.

docs/methods/alds.md#decomposition (Liebenwein et al., NeurIPS 2021, §3): the weight
(f, c, kh, kw) is folded to f x (c·kh·kw); the c input channels are split into k equal,
consecutive groups; each group's f x (c/k·kh·kw) block W_g is truncated to rank j by SVD,
W_g ≈ (U_g sqrt(S_g)) (sqrt(S_g) V_g^T). The layer then really runs two smaller ops:

- encoder: a grouped conv c -> j·k channels, groups=k, the original kernel, stride,
  padding and dilation, no bias (weight (j·k, c/k, kh, kw), group g's rows g·j..g·j+j-1);
- decoder: a 1x1 conv j·k -> f with the original bias (weight (f, j·k)).

A Linear layer is the same with kh = kw = 1 (a block-diagonal encoder, then a dense
decoder). Stored: the two factors at `factor_dtype` (fp32 by default, or the layer's
dtype) plus the host's bias; weights j·(k·f + c·kh·kw) instead of f·c·kh·kw.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...encoding import Encoding
from ...layers import CompressedLayer, planned_spec, register_layer


def fold(weight: torch.Tensor) -> torch.Tensor:
    """The weight as f x (c·kh·kw) (C_in-major, then kh, kw): ALDS's folded matrix."""
    return weight.reshape(weight.shape[0], -1)


def factorize(weight: torch.Tensor, groups: int, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped truncated SVD of one weight: (encoder, decoder) in float32.

    encoder: (rank·groups, c/groups, *kernel); decoder: (f, rank·groups). Each group's
    block is factored in float64 and sqrt(S) is split between the two factors
    (docs/methods/alds.md#decomposition), so both factors have comparable scales.
    """
    f, c = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    if c % groups:
        raise ValueError(f"groups={groups} does not divide {c} input channels")
    per = c // groups * math.prod(kernel)
    if not 1 <= rank <= min(f, per):
        raise ValueError(f"rank {rank} outside 1..{min(f, per)} for groups={groups}")
    blocks = fold(weight.detach().double().cpu()).reshape(f, groups, per).transpose(0, 1)
    blocks = blocks.contiguous()
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)  # (k, f, r), (k, r), (k, r, per)
    root = s[:, :rank].sqrt()
    dec = u[:, :, :rank] * root[:, None, :]                 # (k, f, j)
    enc = root[:, :, None] * vh[:, :rank, :]                # (k, j, per)
    decoder = dec.permute(1, 0, 2).reshape(f, groups * rank)
    encoder = enc.reshape(groups * rank, c // groups, *kernel)
    return encoder.float(), decoder.float()


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().clone(memory_format=torch.contiguous_format)


@register_layer
class LowRankLayer(CompressedLayer):
    """A Conv2d (groups=1) or Linear layer run as a grouped encoder and a 1x1 decoder.

    The host keeps its bias, stride, padding and dilation. Convs whose class has its own
    forward (EfficientNet's static same-padding convs) run that forward with the encoder
    as weight and `groups` set to k for the call; plain nn.Conv2d / nn.Linear call
    F.conv2d / F.linear directly.
    """

    kind = "lowrank"

    def __init__(self, module: nn.Module, encoder: torch.Tensor, decoder: torch.Tensor,
                 groups: int, factor_dtype: str = "float32") -> None:
        super().__init__(module, 0)
        f, c = self.weight_shape[0], self.weight_shape[1]
        kernel = self.weight_shape[2:]
        k = int(groups)
        if k < 1 or c % k:
            raise ValueError(f"groups={k} must divide {c} input channels")
        jk = encoder.shape[0]
        if jk % k or jk == 0 or tuple(encoder.shape[1:]) != (c // k, *kernel):
            raise ValueError(f"encoder {tuple(encoder.shape)} does not fit weight "
                             f"{self.weight_shape} with groups={k}")
        if tuple(decoder.shape) != (f, jk):
            raise ValueError(f"decoder must be ({f}, {jk}), got {tuple(decoder.shape)}")
        Encoding.of(factor_dtype)  # validates the name
        self.groups = k
        self.rank = jk // k
        self.factor_dtype = factor_dtype
        # contiguous, as a loaded layer's are: same strides, same kernels, same outputs
        self.encoder = nn.Parameter(_fresh(encoder))
        self.decoder = nn.Parameter(_fresh(decoder))
        self.error_bounds: dict[str, float] = {}  # set by the method; not saved

    @property
    def n_params(self) -> int:
        """Stored factor weights: j·(k·f + c·kh·kw)."""
        return self.encoder.numel() + self.decoder.numel()

    def decode_weight(self) -> torch.Tensor:
        """The dense weight decoder·blockdiag(encoder), in the weight's shape."""
        f, k, j = self.weight_shape[0], self.groups, self.rank
        enc = self.encoder.reshape(k, j, -1)                       # (k, j, per)
        dec = self.decoder.reshape(f, k, j).transpose(0, 1)         # (k, f, j)
        blocks = torch.bmm(dec, enc)                                 # (k, f, per)
        return blocks.transpose(0, 1).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight_dtype
        enc, dec = self.encoder.to(dtype), self.decoder.to(dtype)
        host = self.host
        if isinstance(host, nn.Linear):
            k, j = self.groups, self.rank
            xs = x.reshape(*x.shape[:-1], k, x.shape[-1] // k)
            z = torch.einsum("...gi,gji->...gj", xs, enc.reshape(k, j, -1))
            return F.linear(z.reshape(*x.shape[:-1], k * j), dec, host.bias)
        z = self._encode_conv(x, enc)
        return F.conv2d(z, dec[:, :, None, None], host.bias)

    def _encode_conv(self, x: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        host = self.host
        if type(host).forward is nn.Conv2d.forward:
            if host.padding_mode != "zeros":
                x = F.pad(x, host._reversed_padding_repeated_twice, mode=host.padding_mode)
                return F.conv2d(x, enc, None, host.stride, 0, host.dilation, self.groups)
            return F.conv2d(x, enc, None, host.stride, host.padding, host.dilation,
                            self.groups)
        params: dict[str, Any] = {"weight": enc}
        if host.bias is not None:
            params["bias"] = torch.zeros(enc.shape[0], dtype=enc.dtype, device=enc.device)
        original = host.groups
        host.groups = self.groups
        try:
            return functional_call(host, params, (x,))
        finally:
            host.groups = original

    @classmethod
    def plan_spec(cls, module: nn.Module, groups: int, rank: int, factor_dtype: str
                  ) -> dict[str, Any]:
        """The spec of the layer that will factorise `module` at (groups, rank)."""
        return planned_spec(cls.kind, module, 0, groups=int(groups), rank=int(rank),
                            factor_dtype=factor_dtype)

    def stored_extra(self) -> dict[str, tuple[torch.Tensor, Encoding]]:
        enc = Encoding.of(self.factor_dtype)
        return {"encoder": (self.encoder, enc), "decoder": (self.decoder, enc)}

    def spec_extra(self) -> dict[str, Any]:
        return {"groups": self.groups, "rank": self.rank, "factor_dtype": self.factor_dtype}

    @classmethod
    def _allocate(cls, module: nn.Module, out_axis: int, extra: dict[str, Any]
                  ) -> LowRankLayer:
        if out_axis != 0:
            raise ValueError("low-rank layers fold along output axis 0")
        shape = tuple(module.weight.shape)
        k, j = int(extra["groups"]), int(extra["rank"])
        f, c = shape[0], shape[1]
        if k < 1 or c % k or not 1 <= j <= f * c:
            raise ValueError(f"groups={k}, rank={j} do not fit weight {shape}")
        encoder = torch.zeros(j * k, c // k, *shape[2:])
        return cls(module, encoder, torch.zeros(f, j * k), k,
                   str(extra.get("factor_dtype", "float32")))

    def describe(self) -> str:
        f, c = self.weight_shape[0], self.weight_shape[1]
        dense = math.prod(self.weight_shape)
        text = (f"k={self.groups} groups, rank j={self.rank} ({c}->{self.rank * self.groups}"
                f"->{f}), {self.n_params}/{dense} weights ({self.n_params / dense:.1%})")
        if self.error_bounds:
            text += ", rel. error " + " ".join(f"{k} {v:.3g}"
                                               for k, v in self.error_bounds.items())
        return text
