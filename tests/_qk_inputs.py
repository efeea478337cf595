"""Random per-layer q, k and patch labels for the loss tests (shared by the loss test modules)."""
import torch


def make_inputs(batch, heads, prefix, patches, head_dim, layers, *, dtype=torch.float32, ignore_frac=0.3,
                num_classes=3, seed=0):
    """L leaf q and k of shape (B, H, C + P, d) requiring grad, and (B, P) int64 labels in [0, num_classes) with
    about ``ignore_frac`` of them 255 (ignored)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = prefix + patches
    qs = [torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=dtype).requires_grad_()
          for _ in range(layers)]
    ks = [torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=dtype).requires_grad_()
          for _ in range(layers)]
    labels = torch.randint(0, num_classes, (batch, patches), generator=gen)
    labels[torch.rand(batch, patches, generator=gen) < ignore_frac] = 255
    return qs, ks, labels
