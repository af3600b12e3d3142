"""Per-layer inputs of an open_clip VisionTransformer, one layer at a time (LOT, RegMean, CAT), and the closed
forms over their Gram matrices (LOT's and RegMean's per-layer solutions).

Data-based closed-form merges need, for every linear map and every LayerNorm of the encoder,
the inputs that layer sees when an expert runs on its task's exemplars. Forward hooks cannot
collect them all on open_clip: ``attn`` is an ``nn.MultiheadAttention`` whose ``in_proj_weight``
is a bare Parameter and whose ``out_proj`` is called through ``F.multi_head_attention_forward``,
so hooks on ``out_proj`` never fire. This module therefore runs the encoder's forward pass by
hand (the same operations as open_clip's ``VisionTransformer.forward`` for the default
configuration: token pooling, no attentional pooler, ``final_ln_after_pool=False``) and yields
every *site* (a linear map or a LayerNorm) with its inputs, in forward order:

``conv1`` (as a linear map on flattened patches), ``ln_pre``, then for each block ``ln_1``,
``attn.in_proj``, ``attn.out_proj`` (the concatenated per-head attention context), ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj`` (the activation's output), then ``ln_post`` and ``proj`` (CLS token
only: the other tokens never reach the output).

``iter_sites`` is a generator: the forward pass advances only when the consumer asks for the
next site, so zipping the generators of several experts walks them in lock step, and a merge
can process one layer of all experts at a time while holding only that layer's inputs and each
expert's residual stream (``lockstep_sites``).

For a LayerNorm the yielded inputs are the *normalized* inputs x_hat (before the affine map),
which is what closed forms over LN scales need. Linear weights are exposed in the torch
``[out, in]`` orientation by ``as_matrix`` / ``from_matrix`` (``proj`` is stored ``[in, out]``
and ``conv1`` as a 4-D kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Site:
    """One linear map or LayerNorm of the encoder, and the inputs it received.

    ``inputs`` is ``[N, d_in]`` (all tokens of all images flattened, or the CLS tokens for
    ``ln_post``/``proj``); for ``kind == "norm"`` it holds the normalized inputs x_hat.
    ``weight`` / ``bias`` are state-dict keys (``bias`` is None when the layer has none).
    """

    name: str
    kind: str                    # "linear" | "norm"
    weight: str
    bias: str | None
    inputs: Tensor
    module: nn.Module | None = None  # the module applied (tests use it to check outputs)

    @property
    def group(self) -> str:
        """'block' for the layers inside the residual blocks, 'io' for embedding/output layers."""
        return "block" if ".resblocks." in self.name else "io"


def as_matrix(key: str, tensor: Tensor) -> Tensor:
    """A linear weight in the ``[out, in]`` orientation (proj is transposed, conv1 flattened)."""
    if key == "proj":
        return tensor.t()
    if tensor.dim() == 4:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor


def from_matrix(key: str, matrix: Tensor, like: Tensor) -> Tensor:
    """Inverse of ``as_matrix``: back to the stored shape and dtype of ``like``."""
    if key == "proj":
        matrix = matrix.t()
    return matrix.reshape(like.shape).to(like.dtype).contiguous()


def gram(x: Tensor, dtype=torch.float64, normalize: bool = True) -> Tensor:
    """X^T X of ``[N, d]`` inputs in ``dtype`` (divided by N when ``normalize``)."""
    x = x.to(dtype)
    g = x.t() @ x
    return g / x.shape[0] if normalize else g


def sq_norms(x: Tensor, dtype=torch.float64, normalize: bool = True) -> Tensor:
    """Per-dimension sum (or mean) of squared inputs: the diagonal of the Gram matrix."""
    x = x.to(dtype)
    s = (x * x).sum(0)
    return s / x.shape[0] if normalize else s


def _normalized(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)


def _attention_context(attn: nn.MultiheadAttention, h: Tensor) -> Tensor:
    """The input of ``attn.out_proj``: softmax(q k^T / sqrt(d_h)) v with heads concatenated. h: [B, L, D]."""
    b, length, d = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, dh]
    ctx = F.scaled_dot_product_attention(q, k, v)
    return ctx.transpose(1, 2).reshape(b, length, d)


def _check_supported(encoder: nn.Module):
    if getattr(encoder, "attn_pool", None) is not None or getattr(encoder, "final_ln_after_pool", False) \
            or getattr(encoder, "pool_type", "tok") != "tok":
        raise NotImplementedError("activations: only token pooling (the CLIP ViT default) is supported")
    if not isinstance(getattr(encoder, "patch_dropout", nn.Identity()), nn.Identity) and encoder.training:
        raise NotImplementedError("activations: run the encoder in eval mode")
    if any(not isinstance(b.ls_1, nn.Identity) or hasattr(b, "ln_1_kv") for b in encoder.transformer.resblocks):
        raise NotImplementedError("activations: LayerScale / cross-attention blocks are not supported")


@torch.no_grad()
def iter_sites(encoder: nn.Module, images: Tensor, output: dict | None = None) -> Iterator[Site]:
    """Run ``encoder`` on ``images`` by hand, yielding every linear/norm site with its inputs.

    If ``output`` is a dict, the encoder's output features are stored in ``output["features"]``
    when the generator is exhausted (tests compare them with ``encoder(images)``).
    """
    _check_supported(encoder)
    batch = images.shape[0]
    dtype = encoder.conv1.weight.dtype
    images = images.to(dtype)
    ps = encoder.conv1.kernel_size
    patches = F.unfold(images, kernel_size=ps, stride=encoder.conv1.stride)      # [B, C*ph*pw, P]
    yield Site("conv1", "linear", "conv1.weight", None, patches.transpose(1, 2).reshape(-1, patches.shape[1]),
               encoder.conv1)
    x = encoder.conv1(images).reshape(batch, encoder.conv1.out_channels, -1).permute(0, 2, 1)  # [B, P, D]
    cls = encoder.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
    x = torch.cat([cls, x], dim=1) + encoder.positional_embedding.to(x.dtype)
    width = x.shape[-1]

    if isinstance(encoder.ln_pre, nn.LayerNorm):
        yield Site("ln_pre", "norm", "ln_pre.weight", "ln_pre.bias", _normalized(encoder.ln_pre, x).reshape(-1, width),
                   encoder.ln_pre)
    x = encoder.ln_pre(x)

    for i, block in enumerate(encoder.transformer.resblocks):
        p = f"transformer.resblocks.{i}"
        yield Site(f"{p}.ln_1", "norm", f"{p}.ln_1.weight", f"{p}.ln_1.bias",
                   _normalized(block.ln_1, x).reshape(-1, width), block.ln_1)
        h = block.ln_1(x)
        yield Site(f"{p}.attn.in_proj", "linear", f"{p}.attn.in_proj_weight", f"{p}.attn.in_proj_bias",
                   h.reshape(-1, width), block.attn)
        context = _attention_context(block.attn, h)
        yield Site(f"{p}.attn.out_proj", "linear", f"{p}.attn.out_proj.weight", f"{p}.attn.out_proj.bias",
                   context.reshape(-1, width), block.attn.out_proj)
        x = x + block.ls_1(block.attn.out_proj(context))
        yield Site(f"{p}.ln_2", "norm", f"{p}.ln_2.weight", f"{p}.ln_2.bias",
                   _normalized(block.ln_2, x).reshape(-1, width), block.ln_2)
        h = block.ln_2(x)
        yield Site(f"{p}.mlp.c_fc", "linear", f"{p}.mlp.c_fc.weight", f"{p}.mlp.c_fc.bias", h.reshape(-1, width),
                   block.mlp.c_fc)
        a = block.mlp.gelu(block.mlp.c_fc(h))
        yield Site(f"{p}.mlp.c_proj", "linear", f"{p}.mlp.c_proj.weight", f"{p}.mlp.c_proj.bias",
                   a.reshape(-1, a.shape[-1]), block.mlp.c_proj)
        x = x + block.ls_2(block.mlp.c_proj(a))

    pooled = x[:, 0]
    yield Site("ln_post", "norm", "ln_post.weight", "ln_post.bias", _normalized(encoder.ln_post, pooled),
               encoder.ln_post)
    pooled = encoder.ln_post(pooled)
    if encoder.proj is not None:
        yield Site("proj", "linear", "proj", None, pooled, None)
        pooled = pooled @ encoder.proj
    if output is not None:
        output["features"] = pooled


def lockstep_sites(encoders: Sequence[nn.Module], images: Sequence[Tensor]) -> Iterator[list[Site]]:
    """Walk several encoders (e.g. the experts, each on its own task's exemplars) site by site.

    Yields, per site, the list of ``Site`` objects (one per encoder, same layer). Only the
    current layer's inputs and each encoder's residual stream are alive at a time.
    """
    walkers = [iter_sites(e, x) for e, x in zip(encoders, images)]
    for sites in zip(*walkers):
        names = {s.name for s in sites}
        if len(names) != 1:  # pragma: no cover - the encoders share one architecture
            raise RuntimeError(f"encoders disagree on the layer order: {names}")
        yield list(sites)


def site_names(encoder: nn.Module) -> list[str]:
    """The weight keys of every site of ``encoder`` (runs one dummy image)."""
    size = encoder.conv1.kernel_size[0] * encoder.grid_size[0]
    dummy = torch.zeros(1, 3, size, size, device=encoder.conv1.weight.device)
    return [s.weight for s in iter_sites(encoder, dummy)]


BLOCK_LINEAR_SUFFIXES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_block_linear_weight(key: str) -> bool:
    """The four linear maps of a residual block (what WUDI optimizes and RegMean hooks)."""
    return ".resblocks." in key and key.endswith(BLOCK_LINEAR_SUFFIXES)


def expert_sites(ctx, n: int, split: str = "train") -> Iterator[list[Site]]:
    """Each expert run on ``n`` exemplars of its own task (``ctx.exemplars``), site by site in lock step.

    The first item of each yielded list is task ``ctx.tasks[0]``'s site, and so on.
    """
    encoders = [ctx.expert_encoder(t) for t in ctx.tasks]
    images = [ctx.exemplars(t, n=n, split=split) for t in ctx.tasks]
    return lockstep_sites(encoders, images)


def psd_pinv(matrix: Tensor, rtol: float = 1e-10) -> Tensor:
    """Moore-Penrose pseudo-inverse of a symmetric PSD matrix by eigendecomposition (float64).

    Eigenvalues below ``rtol * max eigenvalue`` are treated as zero (their directions get no
    update), which keeps the solve stable for rank-deficient Gram matrices; ``torch.linalg.pinv``'s
    default cutoff (~d * machine epsilon) would instead amplify round-off in those directions.
    """
    m = matrix.to(torch.float64)
    m = (m + m.t()) / 2
    evals, evecs = torch.linalg.eigh(m)
    top = evals.max().clamp_min(0)
    keep = evals > rtol * top
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.t()


# ------------------------------------------------------------------ closed forms over the layers' Gram matrices
# LOT's and RegMean's per-layer solutions: the methods' merges, and diagnose's share of each task's update they keep.


def lot_linear(task_matrices, grams, rtol: float = 1e-8) -> torch.Tensor:
    """T* = (sum_k T_k G_k)(sum_k G_k)^+ for task matrices ``[out, in]`` and Gram matrices ``[in, in]`` (k = 1..K).

    The minimizer of sum_k ||X_k T^T - X_k T_k^T||_F^2 (G_k = X_k^T X_k), computed in float64. Both arguments
    are sequences (or stacked tensors); the sums are accumulated so only one Gram matrix is converted at a time.
    """
    num, den = 0, 0
    for t, g in zip(task_matrices, grams):
        g = g.to(torch.float64)
        num = num + t.to(torch.float64) @ g
        den = den + g
    return num @ psd_pinv(den, rtol)


def shrink_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """G ⊙ (alpha * 11^T + (1 - alpha) * I): off-diagonal entries times alpha, the diagonal unchanged."""
    return alpha * g + (1.0 - alpha) * torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))


def regmean_linear(task_matrices, grams, alpha: float = 0.95) -> torch.Tensor:
    """(sum_k T_k G~_k)(sum_k G~_k)^-1 for ``[out, in]`` task matrices and ``[in, in]`` Grams (float64).

    The closed form of min_W sum_k ||X_k W^T - X_k W_k^T||^2 with shrunk Grams. It is written on task
    vectors T_k = W_k - W_0: since (sum_k W_0 G~_k)(sum_k G~_k)^-1 = W_0 this is the same solution, with less
    cancellation. The inverse is the eigendecomposition pseudo-inverse (equal to the inverse when the
    shrunk sum is invertible, which alpha < 1 ensures for any input with non-zero variance per dimension).
    """
    num, den = 0, 0
    for t, g in zip(task_matrices, grams):
        g = shrink_off_diagonal(g.to(torch.float64), alpha)
        num = num + t.to(torch.float64) @ g
        den = den + g
    return num @ psd_pinv(den, 1e-12)
