"""RegMean: merging linear layers in closed form from the Gram matrices of their inputs."""

from __future__ import annotations

from mergebench.activations import as_matrix, expert_sites, from_matrix, gram, regmean_linear
from mergebench.registry import Paper, register_method

REGMEAN = Paper("Dataless Knowledge Fusion by Merging Weights of Language Models", 2023, "2212.09849", "ICLR",
                "https://github.com/bloomberg/dataless-model-merging")


@register_method(
    "regmean", display_name="RegMean", family="data-based closed form", paper=REGMEAN, needs="unlabeled",
    defaults_source="alpha 0.95 and 256 training exemplars per task: fusion_bench config/method/regmean/"
                    "clip_regmean.yaml (reduce_non_diagonal_ratio 0.95, num_regmean_examples 256) for CLIP ViT",
    hyperparameter_help={"n_exemplars": "unlabeled training images per task run through its expert",
                         "alpha": "off-diagonal scaling of the Gram matrices (1: none, 0: diagonal only)"},
    paper_budget={"n_exemplars": 256}, smoke={"n_exemplars": 8},
    ranges={"n_exemplars": "[1, inf)", "alpha": "[0, 1]"})
def regmean(ctx, n_exemplars: int = 256, alpha: float = 0.95):
    """Linear layers: W* = (sum_k W_k G~_k)(sum_k G~_k)^-1, G~_k = G_k with off-diagonals times alpha; the rest averaged.

    G_k = X_k^T X_k / N_k from the inputs of the layer when expert k runs on task k's exemplars (all tokens, as
    fusion_bench's per-token average). The linear layers are every linear map the model applies as one: the four
    of each residual block (attn in_proj -- the fused q/k/v of open_clip, collected from ln_1's output --,
    attn out_proj -- its input recomputed as the per-head attention context, since hooks do not fire on
    nn.MultiheadAttention's fused path --, mlp c_fc, mlp c_proj) and the output projection ``proj``. Everything
    else (LayerNorms, biases, embeddings, the patch-embedding convolution) is the simple average of the experts,
    as in the paper. No scaling coefficient.

    Deviation: ``proj`` is an nn.Parameter in open_clip (HF CLIP's visual_projection is an nn.Linear); we treat it as
    the linear layer it is.
    """
    tvs = list(ctx.task_vectors().values())
    delta = sum(tvs) / len(tvs)
    for sites in expert_sites(ctx, n_exemplars, "train"):
        site = sites[0]
        if site.kind != "linear" or site.name == "conv1":
            continue
        key = site.weight
        t = (as_matrix(key, tv[key]) for tv in tvs)
        g = (gram(s.inputs) for s in sites)
        delta[key] = from_matrix(key, regmean_linear(t, g, alpha), tvs[0][key])
    return ctx.shared_model(ctx.pretrained_weights + delta)
