"""The singular value decompositions merging methods use, each computed the cheapest way that gives its factors.

- :func:`svd`: ``torch.linalg.svd(a, full_matrices=False)``, retried in float64, then with ``gesvd``, where LAPACK
  does not converge.
- :func:`top_singular`: only the top ``k`` triplets (TSV-M keeps min(m, n) / T per task).
- :func:`polar` and :func:`polar_and_singular_values`: ``U V^T`` (the nearest matrix with orthonormal columns or
  rows) and ``S``.

The last two come from the eigendecomposition of the smaller Gram matrix (``a^T a`` or ``a a^T``) in float64: on two
CPU threads it takes about half the time of the SVD (a 3,072 x 768 matrix: 0.26-0.33 s against 0.51-0.63 s;
docs/benchmarks/README.md), the Gram product parallelizing where the SVD's bidiagonalization does not. Where the
singular values they need are too small for the Gram matrix to determine their vectors (a rank-deficient sum of
LoRA updates), they take the SVD instead, whose factors are then exactly :func:`svd`'s. All work batched over
leading dimensions. A singular vector's sign is LAPACK's choice either way; the methods use the factors in products
``u_i s_i v_i^T`` that do not depend on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# The Gram route is taken when every singular value it needs is at least this fraction of the largest: float64's
# eigenvalue error (~1e-16 of the largest squared) is then far below each of them, and the factors are exact to
# float32's precision. Smaller ones (a LoRA expert's rank-8 update asked for 16 triplets) take the SVD.
GRAM_MIN_RATIO = 1e-3


def svd(a: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a)``, retried where LAPACK fails to converge (seen on CPU for ViT-B/32-shaped task sums):
    in float64, then with the slower but more robust ``gesvd`` algorithm (torch's ``driver='gesvd'`` on CUDA, scipy's
    ``lapack_driver='gesvd'`` on CPU, batched by a loop). The factors come back in ``a``'s dtype."""
    try:
        return torch.linalg.svd(a, full_matrices=full_matrices)
    except torch.linalg.LinAlgError:
        pass
    x = a.double()
    try:
        factors = torch.linalg.svd(x, full_matrices=full_matrices)
    except torch.linalg.LinAlgError:
        if x.is_cuda:
            factors = torch.linalg.svd(x, full_matrices=full_matrices, driver="gesvd")
        else:
            import scipy.linalg   # only on this rare path
            flat = x.reshape(-1, *x.shape[-2:]).numpy()
            parts = [scipy.linalg.svd(m, full_matrices=full_matrices, lapack_driver="gesvd") for m in flat]
            factors = [torch.from_numpy(np.stack(f)).reshape(*x.shape[:-2], *f[0].shape) for f in zip(*parts)]
    return tuple(f.to(a.dtype) for f in factors)


def top_singular(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of each matrix: ``U[..., :k], S[..., :k], V^H[..., :k, :]`` of
    ``torch.linalg.svd(a)``.

    Computed from the eigenvectors of the smaller Gram matrix (``a^T a`` or ``a a^T``) in float64, which costs a
    fraction of the full SVD on the CPU; the other factor is ``a v / s``. Falls back to :func:`svd` when a kept
    singular value is below ``GRAM_MIN_RATIO`` of the largest (its vectors would not be determined by the Gram
    matrix)."""
    gram = _gram_eigh(a) if k < min(a.shape[-2:]) else None
    if gram is None or not _well_conditioned(gram[1][..., -k], gram[1][..., -1]):
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    x, singular, vectors, tall = gram
    top = vectors[..., -k:].flip(-1)
    s = singular[..., -k:].flip(-1)
    if tall:
        u, vh = (x @ top) / s.unsqueeze(-2), top.mT
    else:
        u, vh = top, (top.mT @ x) / s.unsqueeze(-1)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _gram_eigh(a: Tensor) -> tuple[Tensor, Tensor, Tensor, bool] | None:
    """(a in float64, its singular values (ascending: the square roots of its smaller Gram matrix's eigenvalues),
    that Gram matrix's eigenvectors, whether a is tall), or None where LAPACK does not converge (a Gram matrix with
    many repeated eigenvalues: a rank-deficient LoRA sum)."""
    x = a.double()
    tall = a.shape[-2] >= a.shape[-1]
    try:
        values, vectors = torch.linalg.eigh(x.mT @ x if tall else x @ x.mT)
    except torch.linalg.LinAlgError:
        return None
    return x, values.clamp(min=0).sqrt(), vectors, tall


def _well_conditioned(smallest: Tensor, largest: Tensor) -> bool:
    """Whether every needed singular value is above ``GRAM_MIN_RATIO`` of the largest (and that is not zero)."""
    return bool((smallest > GRAM_MIN_RATIO * largest).all())


def polar_and_singular_values(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(U V^T, S)`` of the SVD ``a = U S V^T`` (``S`` descending): ``a V S^-1 V^T`` (or ``U S^-1 U^T a``) from
    the Gram matrix's eigenvectors; from :func:`svd` when the smallest singular value is below ``GRAM_MIN_RATIO``
    of the largest."""
    gram = _gram_eigh(a)
    if gram is None or not _well_conditioned(gram[1][..., 0], gram[1][..., -1]):
        u, s, vh = svd(a)
        return u @ vh, s
    x, s, vectors, tall = gram
    scaled = vectors / s.unsqueeze(-2)                                  # V S^-1 (or U S^-1)
    q = (x @ scaled) @ vectors.mT if tall else vectors @ (scaled.mT @ x)
    return q.to(a.dtype), s.flip(-1).to(a.dtype)


def polar(matrix: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows): ``U V^T`` of the SVD ``U S V^T``."""
    return polar_and_singular_values(matrix)[0]
