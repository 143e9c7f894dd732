"""Online rotations folded into dense weights (spec/formats.md §11.1): the matrix
compressed-tensors multiplies a Linear layer's input or output by, applied to its weight once
instead, so a dense model computes what the rotated checkpoint computes at run time. Exact
linear algebra; computed in float64 and rounded once to the output dtype."""
from __future__ import annotations

import torch

from .scheme import Transform
from .spec import TRANSFORM_TYPES

__all__ = ["rotation_matrix", "fold", "fold_bias"]


def rotation_matrix(t: Transform, weight: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix CT multiplies activations by (HadamardTransform / RandomMatrixTransform):
    R[perm][:, perm], transposed when a Hadamard entry is inverse, over sqrt(n) for the Hadamard
    types (a random matrix stores what it applies, its inverse included)."""
    r = weight.to(torch.float64)
    if perm is not None:
        r = r[perm][:, perm]
    if t.type != TRANSFORM_TYPES[2]:
        if t.inverse:
            r = r.T
        r = r / torch.tensor(r.shape[0], dtype=torch.float64).sqrt()
    return r


def fold(weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor | None,
         outputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') with x·W'ᵀ + b' = rot_out(rot_in(x)·Wᵀ + b): an input rotation x -> x·B gives
    W·Bᵀ, an output rotation y -> y·C gives Cᵀ·W and b·C; B, C block-diagonal copies of the
    given n x n matrices over `in` and `out` (CT's _multihead_matmul). Float64 results."""
    w = weight.to(torch.float64)
    if inputs is not None:
        w = (w.unflatten(-1, (-1, inputs.shape[0])) @ inputs.T.to(w.device)).flatten(-2)
    if outputs is not None:
        c = outputs.to(w.device)
        w = (c.T @ w.unflatten(-2, (-1, c.shape[0]))).flatten(-3, -2)
        if bias is not None:
            bias = fold_bias(bias, c)
    return w, bias


def fold_bias(bias: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """b·C for an output rotation (CT rotates the layer's output, bias included); float64."""
    c = outputs.to(bias.device)
    return (bias.to(torch.float64).unflatten(-1, (-1, c.shape[0])) @ c).flatten(-2)
