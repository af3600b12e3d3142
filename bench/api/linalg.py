"""The singular value decompositions merging methods use, each computed the cheapest way that gives its factors.

- :func:`svd`: ``torch.linalg.svd(a, full_matrices=False)``, computed on the tall orientation of each matrix
  (LAPACK's divide-and-conquer SVD of a wide 768 x 3072 matrix took 2x the time of its 3072 x 768 transpose on the
  CPUs measured, docs/benchmarks/README.md) and retried in float64, then with ``gesvd``, where LAPACK does not
  converge.
- :func:`top_singular`: only the top ``k`` triplets (TSV-M keeps min(m, n) / T per task), from the eigenvectors of
  the smaller Gram matrix in float64; the full SVD where the kept singular values are too small for that.
- :func:`polar`: ``U V^T``, the nearest matrix with orthonormal columns (or rows).

All work batched over leading dimensions. The factors of a singular value's sign are LAPACK's own choice either way:
the methods use them in products ``u_i s_i v_i^T`` that do not depend on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# top_singular's Gram route is used when every kept singular value is at least this fraction of the largest: then
# float64's eigenvalue error (~1e-16 of the largest squared) is far below each kept one, and U = A V / s is exact to
# float32's precision. Smaller kept values (a LoRA expert's rank-8 update asked for 16 triplets) take the full SVD.
GRAM_MIN_RATIO = 1e-3


def svd(a: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, V^H = torch.linalg.svd(a)``, the SVD of each matrix computed on its tall orientation."""
    if a.shape[-2] < a.shape[-1] and not full_matrices:
        v, s, uh = _robust_svd(a.mT, full_matrices)
        return uh.mT, s, v.mT
    return _robust_svd(a, full_matrices)


def _robust_svd(a: Tensor, full_matrices: bool) -> tuple[Tensor, Tensor, Tensor]:
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
    m, n = a.shape[-2:]
    if k >= min(m, n):
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    x = a.double()
    tall = m >= n
    gram = x.mT @ x if tall else x @ x.mT
    values, vectors = torch.linalg.eigh(gram)                      # ascending
    top = vectors[..., -k:].flip(-1)
    s = values[..., -k:].flip(-1).clamp(min=0).sqrt()
    if not bool((s[..., -1] >= GRAM_MIN_RATIO * s[..., 0]).all()):
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    if tall:
        u, vh = (x @ top) / s.unsqueeze(-2), top.mT
    else:
        u, vh = top, (top.mT @ x) / s.unsqueeze(-1)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def polar(matrix: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows): P Q^T from the SVD P S Q^T."""
    p, _, qh = svd(matrix)
    return p @ qh
