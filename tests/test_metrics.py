"""Parameter counting from stored tensors, and fvcore FLOP counting against analytic counts."""

import torch

from mergebench.engine.metrics import count_macs, parameter_counts
from mergebench.api.models import PerTaskModel, SharedModel, build_encoder

VIT_B_32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512, act="quick_gelu")


def vit_macs(image=224, patch=32, width=768, layers=12, out=512):
    """Analytic multiply-accumulates of a CLIP ViT image encoder for one image."""
    n = (image // patch) ** 2 + 1
    per_block = 12 * n * width**2 + 2 * n * n * width  # qkv + out-proj + MLP(4x), then QK^T and AV
    patch_embed = (n - 1) * width * 3 * patch * patch
    return layers * per_block + patch_embed + width * out


def test_vit_b32_macs_match_analytic_count_within_one_percent():
    encoder = build_encoder(VIT_B_32).eval()
    counted = count_macs(encoder, (3, 224, 224))
    analytic = vit_macs()
    assert abs(analytic - 4.409e9) < 0.01e9  # about 4.4 GMAC, as published for ViT-B/32
    assert abs(counted["macs"] - analytic) / analytic < 0.01, (counted["macs"], analytic)
    # attention is counted, not skipped
    assert any("attention" in op for op in counted["by_operator"]), counted["by_operator"]


def test_frozen_encoder_fused_attention_path_is_counted():
    # frozen parameters + no_grad take nn.MultiheadAttention's fused fast path
    encoder = build_encoder(dict(VIT_B_32, layers=2)).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    counted = count_macs(encoder, (3, 224, 224))["macs"]
    assert abs(counted - vit_macs(layers=2)) / vit_macs(layers=2) < 0.01


def test_parameter_counts_from_tensors():
    cfg = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, output_dim=16)
    enc = build_encoder(cfg)
    n = sum(p.numel() for p in enc.parameters())
    nbytes = n * 4
    shared = parameter_counts(SharedModel(enc), n, nbytes)
    assert shared["added"] == 0 and shared["added_pct"] == 0
    three = parameter_counts(PerTaskModel({t: build_encoder(cfg) for t in "abc"}), n, nbytes)
    assert three["added"] == 2 * n and three["added_pct"] == 200.0

    class Masked(SharedModel):
        def __init__(self, encoder):
            super().__init__(encoder)
            self.register_buffer("mask", torch.ones(1000, dtype=torch.bool))

    masked = parameter_counts(Masked(enc), n, nbytes)
    assert masked["added"] == 1000 and masked["added_bits"] == 1000 and masked["added_bytes"] == 125
    # the same tensor shared twice is stored once
    shared_twice = PerTaskModel({"a": enc, "b": enc})
    assert parameter_counts(shared_twice, n, nbytes)["added"] == 0
