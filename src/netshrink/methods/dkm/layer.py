"""`DKMLayer`: the train-time DKM layer (Cho et al., ICLR 2022, §3.2), a `PalettizedLayer`.

It keeps the dense latent weight (optionally divided by a per-output-channel scale) as a
trainable Parameter, and the current centroids as the palette's codebook (not trained by
the optimiser: DKM recomputes them every forward pass). In training mode the forward pass
runs the differentiable k-means iterations (`soft.dkm`), warm-started from the detached
centroids of the previous step, and computes with the soft weights W~ = A C; the final
centroids are kept (detached) for the next step. In evaluation mode, and in `decode_weight`
(what the report, save and load see), every vector snaps to its nearest centroid: the
hard palette. `snapped()` turns it into the plain `PalettizedLayer` that is saved, so the
stored form (codes at b bits per vector, fp16 LUT, per-channel scale) is the foundation's.

Vectors: each output row (`out_axis_of`) is cut into d consecutive entries (C_in-major,
then kh, kw), the `PalettizedLayer` layout; with d dividing the row length this is the
paper's contiguous flattening of the weight tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...kmeans import assign
from ...layers import PalettizedLayer, call_with_weight, rows_to_weight
from .soft import DEFAULT_CHUNK_ELEMENTS, dkm

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class DKMLayer(PalettizedLayer):
    """A palettized layer whose assignment is soft and learned during fine-tuning.

    Not registered as a kind of its own: it saves (and is sized) exactly as the
    `PalettizedLayer` it becomes at finalize.
    """

    def __init__(self, module: nn.Module, centroids: torch.Tensor, latent: torch.Tensor,
                 scale: torch.Tensor | None, *, tau: float, iters: int, epsilon: float,
                 stop: str, unique: bool, codebook_dtype: str = "float16",
                 out_axis: int | None = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        k, d = centroids.shape
        weight_dtype = module.weight.dtype
        rows = latent.shape[0]
        codes = torch.zeros(rows, latent.shape[1] // d, dtype=torch.int32,
                            device=latent.device)
        super().__init__(module, codes, centroids, scale, codebook_dtype, out_axis)
        self.codebook.requires_grad_(False)  # recomputed every step, never by the optimiser
        # the latent weight keeps the model's dtype: 16-bit models make eDKM's
        # uniquification exact and cheap (at most 65,536 distinct values)
        self.latent = nn.Parameter(latent.detach().to(weight_dtype).clone())
        self.tau, self.iters, self.epsilon, self.stop = float(tau), int(iters), float(epsilon), stop
        self.unique = bool(unique)
        self.chunk_elements = int(chunk_elements)
        self.last_iters = 0  # k-means iterations of the latest soft forward pass
        self.soft_eval = False  # evaluate with the soft weights (paper Table 5's "train")
        with torch.no_grad():
            self._snap()

    @property
    def d(self) -> int:
        return int(self.codebook.shape[1])

    def _vectors(self) -> torch.Tensor:
        return self.latent.float().reshape(-1, self.d)

    def _to_weight(self, vectors: torch.Tensor) -> torch.Tensor:
        w = vectors.reshape(self.n_rows, -1)
        if self.scale is not None:
            w = w * self.scale[:, None]
        return rows_to_weight(w, self.weight_shape, self.out_axis)

    def soft_weight(self) -> torch.Tensor:
        """W~ = A C after the k-means iterations (differentiable in the latent weight);
        the final centroids become the codebook (warm start of the next call)."""
        unique = self.unique and self.d == 1
        # the latent goes in at its own dtype: 16-bit latents are counted by bit pattern
        out, centroids, self.last_iters = dkm(
            self.latent.reshape(-1, self.d), self.codebook, self.tau, self.iters,
            self.epsilon, self.stop, unique, self.chunk_elements)
        if self.training:  # measuring soft accuracy (`soft_eval`) leaves the state alone
            with torch.no_grad():
                self.codebook.copy_(centroids)
        return self._to_weight(out)

    @torch.no_grad()
    def _snap(self) -> None:
        """Hard assignment: each latent vector's nearest centroid becomes its code."""
        labels, _ = assign(self._vectors().detach(), self.codebook.detach())
        self.codes.copy_(labels.reshape(self.codes.shape).to(torch.int32))

    def decode_weight(self) -> torch.Tensor:
        self._snap()
        return super().decode_weight()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        w = self.soft_weight() if (self.training or self.soft_eval) else self.decode_weight()
        return call_with_weight(self.host, w.to(self.weight_dtype), args, kwargs)

    @torch.no_grad()
    def snapped(self) -> PalettizedLayer:
        """The deployable layer: this layer's host, codes, codebook and scale."""
        self._snap()
        host = self.host
        del self._modules["host"]
        host.weight = nn.Parameter(torch.empty(self.weight_shape, dtype=self.weight_dtype,
                                               device=self.latent.device))
        return PalettizedLayer(host, self.codes, self.codebook, self.scale,
                               self.codebook_dtype, self.out_axis)

    def describe(self) -> str:
        return f"DKM (training), tau={self.tau:.3g}, " + super().describe()

    def extra_repr(self) -> str:
        k, d = self.codebook.shape
        return f"{super().extra_repr()}, k={k}, d={d}, tau={self.tau:.3g}"


def sixteen_bit(module: nn.Module) -> bool:
    return module.weight.dtype in _SIXTEEN_BIT
