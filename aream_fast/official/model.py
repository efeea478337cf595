"""The official MCTformer-V2 model, eager and slow on purpose (Jessie459/AReAM: networks/mctformer.py,
networks/vision_transformer.py; docs/semantics.md, "Model").

* :func:`official_attention` -- the official eager attention: Z = scale q k^T (B, H, N, N) materialised, softmax,
  value product; it returns Z. The one copy of that formula: :class:`OfficialAttention` and
  :func:`forward_with_logits` both call it.
* :class:`OfficialMCTformerV2` -- MCTformer-V2 whose blocks return their **pre-softmax** logits; the forward
  ``torch.stack``s all L of them (L, B, H, N, N), with grad. Its state-dict keys are timm's (``patch_embed.proj``,
  ``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv`` ..., ``head`` a 3x3 conv), so
  :meth:`OfficialMCTformerV2.from_model` loads the weights of ``aream_fast.build_model("mct_deit_small", ...)``.
* :func:`forward_with_logits` -- the same eager forward run on a ``WSSSViT``'s own modules (MCTformer or a
  single-cls-token ViT), for parity tests of the fused model.

Shapes: B batch, C class tokens, P = h * w patches, N = C + P tokens, H heads, d head width, L blocks.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

__all__ = ["official_attention", "OfficialAttention", "OfficialBlock", "OfficialMCTformerV2", "forward_with_logits",
           "eager_logits"]


def official_attention(qkv: nn.Module, proj: nn.Module, x: Tensor, num_heads: int,
                       scale: float) -> Tuple[Tensor, Tensor]:
    """Official eager attention: x (B, N, D) -> (proj(softmax(Z) v) (B, N, D), Z (B, H, N, N) pre-softmax).

    ``qkv`` maps D -> 3 D (q, k, v heads interleaved as in timm), ``proj`` maps D -> D. The softmax (B, H, N, N) is
    saved by autograd for the value product; Z is returned (kept alive by the caller, as the official code does).
    """
    B, N, D = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    z = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N), pre-softmax
    out = (z.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
    return proj(out), z


class OfficialAttention(nn.Module):
    """Eager multi-head attention that returns its pre-softmax logits (official ``Attention``).

    forward(x (B, N, D)) -> (out (B, N, D), Z (B, H, N, N)) with Z = scale * q k^T **before** the softmax.
    The softmax (B, H, N, N) is saved by autograd for the value product; Z is kept alive by the caller.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return official_attention(self.qkv, self.proj, x, self.num_heads, self.scale)


class OfficialBlock(nn.Module):
    """Pre-norm block: x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x))). Returns (x, Z (B, H, N, N))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        o, z = self.attn(self.norm1(x))
        x = x + self.drop_path(o)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, z


class OfficialMCTformerV2(nn.Module):
    """MCTformer-V2 as in the official AReAM code (docs/semantics.md, "Model"), eager attention, every block's Z returned.

    forward(images (B, 3, H, W)) -> (class_logits (B, K), patch_logits (B, K), cam (B, K, h, w) ReLU'd and
    detached, Z (L, B, H, N, N) pre-softmax logits of every block, stacked, with grad).

    The final ``norm`` exists (and is loaded) but is never applied, as in the official code.
    """

    def __init__(self, num_classes: int, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.1):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.num_classes = self.num_prefix_tokens = num_classes  # C = K class tokens
        self.patch_size, self.embed_dim, self.depth, self.num_heads = patch_size, embed_dim, depth, num_heads
        g = img_size // patch_size
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim,
                                      strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + g * g, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList(OfficialBlock(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # loaded, never applied (docs/semantics.md, "Model")
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=3, stride=1, padding=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # official _init_weights: trunc normal 0.02 / zero bias for Linear; LayerNorm keeps (1, 0); the conv head
        # keeps PyTorch's default init. timm's ViT init is that rule.
        self.apply(init_weights_vit_timm)

    @classmethod
    def from_model(cls, model: nn.Module, drop_path: Optional[float] = None) -> "OfficialMCTformerV2":
        """Build the official-formulation twin of one of our MCTformer models and load its weights (strict).

        ``model`` must expose ``num_prefix_tokens``, ``num_heads``, ``depth``, ``patch_size``, ``embed_dim`` and
        timm-style state-dict keys. ``drop_path`` defaults to the rate of ``model``'s last block if it can be
        read, else 0.1 (the official default).
        """
        sd = model.state_dict()
        if "pos_embed" not in sd or "cls_token" not in sd:
            raise ValueError("model has no 'pos_embed'/'cls_token' in its state dict; expected timm-style keys")
        C = int(model.num_prefix_tokens)
        if C < 2:
            raise ValueError(f"OfficialMCTformerV2 needs C = K class tokens (got num_prefix_tokens={C})")
        P0 = sd["pos_embed"].shape[1] - C
        g = int(round(math.sqrt(P0)))
        if g * g != P0:
            raise ValueError(f"pos_embed of model has {P0} patch positions, not a square grid")
        if drop_path is None:
            drop_path = _read_drop_path(model)
        twin = cls(num_classes=C, img_size=g * int(model.patch_size), patch_size=int(model.patch_size),
                   embed_dim=int(model.embed_dim), depth=int(model.depth), num_heads=int(model.num_heads),
                   mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / int(model.embed_dim), drop_path=drop_path)
        twin.load_state_dict(sd, strict=True)
        p = next(model.parameters())
        return twin.to(device=p.device, dtype=p.dtype)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Positional embedding for an (h, w)-patch input: unchanged if P = P0 and square, else the patch grid is
        resized by bicubic with the DINO scale factors ((h + 0.1) / g0, (w + 0.1) / g0) (docs/semantics.md, "Model")."""
        C = self.num_prefix_tokens
        npatch = x.shape[1] - C
        P0 = self.pos_embed.shape[1] - C
        if npatch == P0 and w == h:
            return self.pos_embed
        class_pos = self.pos_embed[:, :C]
        patch_pos = self.pos_embed[:, C:]
        g0 = int(math.sqrt(P0))
        D = x.shape[-1]
        patch_pos = F.interpolate(
            patch_pos.reshape(1, g0, g0, D).permute(0, 3, 1, 2),
            scale_factor=((h + 0.1) / g0, (w + 0.1) / g0),
            mode="bicubic",
            align_corners=False,
        )
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"positional embedding resized to {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, D)
        return torch.cat((class_pos, patch_pos), dim=1)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"images H, W must be multiples of {self.patch_size}, got {(H, W)}")
        h, w = H // self.patch_size, W // self.patch_size
        C = self.num_prefix_tokens
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        attn_weights: List[Tensor] = []
        for blk in self.blocks:
            x, z = blk(x)
            attn_weights.append(z)
        x_cls = x[:, :C]
        x_patch = x[:, C:].reshape(B, h, w, -1).permute(0, 3, 1, 2)
        x_patch = self.head(x_patch)  # (B, K, h, w)
        class_logits = x_cls.mean(-1)
        patch_logits = F.adaptive_avg_pool2d(x_patch, 1).flatten(1)
        cam = F.relu(x_patch).detach().clone()
        return class_logits, patch_logits, cam, torch.stack(attn_weights)  # (L, B, H, N, N)


def _read_drop_path(model: nn.Module) -> float:
    """The stochastic-depth rate of the last block of ``model`` (linear schedule ends there), else 0.1."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) > 0:
        dp = getattr(blocks[-1], "drop_path", None)
        if dp is None:
            dp = getattr(blocks[-1], "drop_path1", None)
        if dp is not None:
            return float(getattr(dp, "drop_prob", 0.0))
    return 0.1


def forward_with_logits(model: nn.Module, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """The official eager forward on a ``WSSSViT``'s own modules (its embedding, blocks and heads).

    images (B, 3, H, W) -> (class_logits (B, K), patch_logits (B, K), cam (B, K, h, w), [Z_l (B, H, N, N)
    pre-softmax, one per block]). DropPath follows ``model``'s mode.
    """
    x, grid = model.embed(images)
    logits = []
    for blk in model.blocks:
        o, z = official_attention(blk.attn.qkv, blk.attn.proj, blk.norm1(x), blk.attn.num_heads, blk.attn.scale)
        x = x + blk.drop_path(o)
        x = x + blk.drop_path(blk.mlp(blk.norm2(x)))
        logits.append(z)
    class_logits, patch_logits, cam = model.heads(x, grid)
    return class_logits, patch_logits, cam, logits


def eager_logits(model: nn.Module, images: Tensor) -> Tuple[Tensor, Tensor]:
    """(cam (B, K, h, w), Z (L, B, H, N, N) stacked pre-softmax logits) of one official eager forward of a
    ``WSSSViT`` (through :func:`forward_with_logits`) or of an official model whose forward returns
    (logits, logits, cam, stacked Z): :class:`OfficialMCTformerV2`, ``aream_fast.official.conformer.OfficialConformer``."""
    if not isinstance(model, OfficialMCTformerV2) and hasattr(model, "embed") and hasattr(model, "heads"):
        _, _, cam, logits = forward_with_logits(model, images)
        return cam, torch.stack(logits)
    _, _, cam, z = model(images)
    return cam, z
