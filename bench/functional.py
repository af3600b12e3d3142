"""The merged encoder as a function of tensors: the engine's fast path for the loops that train merge coefficients.

* :class:`FunctionalMerge`: the merged encoder as a function of trainable merge coefficients,
  ``merged[j] = theta_0[j] + sum_t clamp(lambda[j, t], 0, 1) * tau_t[j]``, run with
  ``torch.func.functional_call`` on one encoder skeleton (no model copy per step). Task-wise
  coefficients are one lambda per task; layer-wise ones are one lambda per parameter tensor
  per task, as in the official AdaMerging code (weight and bias are separate "layers").
  Options used by the methods: unclamped coefficients, a mask shared by the tasks on the
  task-vector sum (Concrete subspace learning), and an overridable ``combined_task_vector``
  (AdaRank builds each tau_t from its masked SVD). The test-time adaptation methods
  (``mergebench.methods.adaptive``) and ``diagnose``'s coefficient headroom train it.
* :func:`vit_forward`: the open_clip ViT's forward written out as functions of the merged tensors (the same
  operations in the same order, the attention as two batched matmuls and a softmax): the adaptation loops'
  forward and backward pass, under the run's precision (``ctx.autocast()``), for the encoders it covers.
"""

from __future__ import annotations

from typing import Sequence

import open_clip.transformer as oc
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torch.func import functional_call

from mergebench.models import Granularity, MergeState, _QuickGELU, freeze
from mergebench.weights import Weights


class FunctionalMerge(nn.Module):
    """theta(lambda) = theta_0 + sum_t clamp(lambda_t, 0, 1) * tau_t, differentiable in lambda.

    ``encoder`` is only a skeleton: its own tensors are never read for the merged keys (they
    are replaced in ``functional_call``). The coefficient on theta_0 is fixed at 1 and the
    task coefficients are not normalised, as in the official code.
    """

    def __init__(self, encoder: nn.Module, pretrained: Weights, task_vectors: Sequence[Weights],
                 granularity: Granularity = "layer", init: float | Tensor = 0.3,
                 clamp: tuple[float, float] | None = (0.0, 1.0)):
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.encoder = freeze(encoder)
        self.granularity = granularity
        self.clamp = clamp  # None: unclamped coefficients (Concrete AdaMerging, AdaRank)
        self.keys = list(pretrained)
        self.num_tasks = len(task_vectors)
        # plain attributes, not buffers: the training scaffold is not part of any returned model
        self.theta0 = {k: pretrained[k].detach() for k in self.keys}
        self.tau = {k: torch.stack([tv[k].detach() for tv in task_vectors]) for k in self.keys}
        rows = len(self.keys) if granularity == "layer" else 1
        if isinstance(init, Tensor):
            init = init.detach().to(torch.float32).reshape(-1, self.num_tasks)
            if init.shape[0] == 1 and rows > 1:
                init = init.expand(rows, -1)
            if tuple(init.shape) != (rows, self.num_tasks):
                raise ValueError(f"initial coefficients have shape {tuple(init.shape)}, expected {(rows, self.num_tasks)}")
            raw = init.clone()
        else:
            raw = torch.full((rows, self.num_tasks), float(init))
        self.lambdas = nn.Parameter(raw.to(next(iter(self.theta0.values())).device))
        self._fast: bool | None = None  # whether vit_forward covers the skeleton (checked on first use)

    def coefficients(self) -> Tensor:
        """The coefficients, (n_tensors or 1, T), clamped to ``clamp`` (hard clamp: zero gradient outside)."""
        return self.lambdas if self.clamp is None else self.lambdas.clamp(*self.clamp)

    def combined_task_vector(self, key: str, coefficients: Tensor) -> Tensor:
        """sum_t c_t tau_t[key]; subclasses that build tau_t[key] another way (AdaRank's masked SVD) override it."""
        return torch.tensordot(coefficients.to(self.tau[key].dtype), self.tau[key], dims=1)

    def merged_weights(self, mask: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """theta_0 + sum_t c_t tau_t, or with ``mask`` (one tensor per key, shared by the tasks, as Concrete
        subspace learning): theta_0 + mask * sum_t c_t tau_t."""
        lam = self.coefficients()
        out = {}
        for j, k in enumerate(self.keys):
            delta = self.combined_task_vector(k, lam[j] if self.granularity == "layer" else lam[0])
            out[k] = self.theta0[k] + (delta if mask is None else mask[k] * delta)
        return out

    def forward(self, images: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Embeddings of the merged encoder (pass ``weights`` to reuse one merge for several batches), through the
        skeleton's own modules (their hooks run: IntervMerge's interventions)."""
        return functional_call(self.encoder, weights if weights is not None else self.merged_weights(), (images,))

    def embed(self, images: Tensor, weights: dict[str, Tensor]) -> Tensor:
        """The same embeddings by the faster :func:`vit_forward` where it covers the skeleton (hooks do not run),
        else by ``forward``."""
        if self._fast is None:
            self._fast = vit_forward_supports(self.encoder)
        return vit_forward(self.encoder, weights, images) if self._fast else self(images, weights)

    @torch.no_grad()
    def final_weights(self, mask: dict[str, Tensor] | None = None) -> Weights:
        return Weights({k: v.detach().clone() for k, v in self.merged_weights(mask).items()})

    def state(self, ties_k: float | None) -> "MergeState":
        return MergeState(self.granularity, self.coefficients().detach().clone(), ties_k)


_ACTIVATIONS = (oc.QuickGELU, _QuickGELU)


def vit_forward_supports(encoder: nn.Module) -> bool:
    """Whether :func:`vit_forward` computes what ``encoder`` (an open_clip VisionTransformer) computes: CLS-token
    pooling with ln_post before it, no attentional pooler, patch dropout or layer scale, plain pre-norm blocks
    with exact GELU or QuickGELU."""
    if not isinstance(encoder, VisionTransformer) or encoder.attn_pool is not None or encoder.pool_type != "tok":
        return False
    if encoder.final_ln_after_pool or encoder.output_tokens or not isinstance(encoder.patch_dropout, nn.Identity):
        return False
    conv = encoder.conv1
    if conv.bias is not None or conv.stride != conv.kernel_size or conv.padding != (0, 0) or conv.groups != 1:
        return False
    if not encoder.transformer.batch_first or encoder.proj is None:
        return False
    if not all(type(m) is oc.LayerNorm for m in (encoder.ln_pre, encoder.ln_post)):
        return False
    for block in encoder.transformer.resblocks:
        if type(block) is not oc.ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        if not all(type(m) is oc.LayerNorm for m in (block.ln_1, block.ln_2)):
            return False
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            return False
        act = block.mlp.gelu
        if not ((type(act) is nn.GELU and act.approximate == "none") or isinstance(act, _ACTIVATIONS)):
            return False
        if not block.attn.batch_first or block.attn.in_proj_weight is None or block.attn.bias_k is not None:
            return False
    return True


def _layer_norm(x: Tensor, weights: dict[str, Tensor], name: str, module: nn.LayerNorm) -> Tensor:
    """open_clip's LayerNorm: float32 statistics under autocast, cast back to the input's dtype."""
    return F.layer_norm(x, module.normalized_shape, weights[f"{name}.weight"], weights[f"{name}.bias"],
                        module.eps).to(x.dtype)


def vit_forward(encoder: VisionTransformer, weights: dict[str, Tensor], images: Tensor) -> Tensor:
    """``functional_call(encoder, weights, (images,))`` for the encoders of :func:`vit_forward_supports`, without
    the modules: the same operations (patch embedding, class token and positions, ln_pre, pre-norm attention
    and MLP blocks, ln_post on the class token, projection) on the merged tensors. The attention is softmax(q k^T
    / sqrt(d)) v as two batched matmuls, in the batch-first layout of the blocks (nn.MultiheadAttention transposes
    to sequence-first and projects q, k, v as one packed tensor whose backward sums three zero-padded copies):
    the same values up to rounding, and under bfloat16 autocast the matmuls stay in bfloat16 where the math
    attention kernel computes in float32."""
    w = weights
    # the patch convolution (stride = kernel) as one matmul on the images' patches: its backward is a matmul too
    kh, kw = encoder.conv1.kernel_size
    patches = images.unfold(2, kh, kh).unfold(3, kw, kw).permute(0, 2, 3, 1, 4, 5)
    batch, width = images.shape[0], w["conv1.weight"].shape[0]
    x = F.linear(patches.reshape(batch, patches.shape[1] * patches.shape[2], -1), w["conv1.weight"].reshape(width, -1))
    x = torch.cat([w["class_embedding"].view(1, 1, -1).expand(batch, -1, -1).to(x.dtype), x], dim=1)
    x = _layer_norm(x + w["positional_embedding"].to(x.dtype), w, "ln_pre", encoder.ln_pre)
    tokens = x.shape[1]
    blocks = encoder.transformer.resblocks
    for i, block in enumerate(blocks):
        p = f"transformer.resblocks.{i}."
        heads = block.attn.num_heads
        # the output reads the class token alone: the last block computes its query, attention output and MLP for
        # that token only (keys and values still for every token); the same values and gradients, a sixth of its cost
        last = i == len(blocks) - 1
        queries = 1 if last else tokens
        h = _layer_norm(x, w, p + "ln_1", block.ln_1)
        w_in, b_in = w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"]
        if last:
            q = F.linear(h[:, :1], w_in[:width], b_in[:width]).view(batch, 1, heads, width // heads).transpose(1, 2)
            kv = F.linear(h, w_in[width:], b_in[width:])
            k, v = kv.view(batch, tokens, 2, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            x = x[:, :1]
        else:
            qkv = F.linear(h, w_in, b_in)
            q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1).to(v.dtype) @ v
        attn = attn.transpose(1, 2).reshape(batch, queries, width)
        x = x + F.linear(attn, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        h = F.linear(_layer_norm(x, w, p + "ln_2", block.ln_2), w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
        h = F.gelu(h) if type(block.mlp.gelu) is nn.GELU else h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    return _layer_norm(x[:, 0], w, "ln_post", encoder.ln_post) @ w["proj"]
