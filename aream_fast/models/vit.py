"""timm-compatible ViT backbones for WSSS: MCTformer-V2 (C class tokens) and single-class-token ViT/DeiT.

Parameter names are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``, ``norm``,
``head``), so DeiT / ViT checkpoints load with ``aream_fast.models.load_pretrained``.

MCTformer-V2 (docs/semantics.md, "Model", networks/mctformer.py of Jessie459/AReAM): C = num_classes class tokens, a
learned
position embedding over all C + P tokens, 12 pre-norm blocks, the final ``norm`` exists but is NOT applied;
class logits = class tokens of the last block averaged over the embedding width; ``head`` = Conv2d(D, C, 3,
pad 1) on the patch tokens gives the map M; patch logits = GAP(M); cam = ReLU(M) detached.

Single-class-token ViT (``vit_small`` / ``vit_base``; DeiT / ToCo style, our choice, documented here): one
cls token, the final ``norm`` IS applied (as in timm); ``head`` = Conv2d(D, K, 1) (a linear classifier used
as a 1x1 conv): M = head(patch tokens), patch logits = GAP(M), cam = ReLU(M) detached, class logits = the
same classifier on the cls token (DeiT's classification of the class token). class_attention is None (the
the C == 1 case of docs/semantics.md, "CAM refinement": no class->patch multiplication).

Every block runs fused attention (``aream_fast.models.attention``) and the forward exports only the per-layer q, k
and the head-mean class->patch rows asked for by an ``AttentionRequest`` (no N x N tensor).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.models.attention import Attention, check_backend
from aream_fast.models.records import AttentionRecords, AttentionRequest, QKHook, ViTOutput


class DropPath(nn.Module):
    """Stochastic depth per sample (active in train mode only), as timm's ``DropPath``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, key ``patch_embed.proj``. (B, 3, H, W) -> (B, D, h, w)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (keys ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x))) (docs/semantics.md,
    "Model")."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, num_prefix_tokens: int, class_attention: bool,
                qk_hook: Optional[Callable] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """x (B, N, D) -> (x, q, k (B, H, N, d), class_attn (B, C, P) or None)."""
        a, q, k, cls_attn = self.attn(self.norm1(x), num_prefix_tokens, class_attention, qk_hook)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, q, k, cls_attn


def _pair(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


def interpolate_patch_pos_embed(patch_pos: Tensor, grid: Tuple[int, int], new_grid: Tuple[int, int]) -> Tensor:
    """Run-time resize of the patch part of a position embedding (docs/semantics.md, "Model",
    ``interpolate_pos_encoding``).

    patch_pos: (1, h0*w0, D) on grid (h0, w0). Unchanged when the grid matches; otherwise bicubic with
    scale_factor = ((h + 0.1) / h0, (w + 0.1) / w0) (the DINO trick; PyTorch then uses these factors for the
    coordinate mapping, as the official code). Returns (1, h*w, D).
    """
    h0, w0 = grid
    h, w = new_grid
    if (h, w) == (h0, w0):
        return patch_pos
    d = patch_pos.shape[-1]
    x = patch_pos.reshape(1, h0, w0, d).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic", align_corners=False)
    if x.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding interpolation produced grid {tuple(x.shape[-2:])}, "
                           f"expected {(h, w)}")
    return x.permute(0, 2, 3, 1).reshape(1, h * w, d)


class WSSSViT(nn.Module):
    """ViT for WSSS with attention-statistics export.

    mct=True: MCTformer-V2 (C = num_classes class tokens). mct=False: one cls token (ViT/DeiT).
    forward(images (B, 3, H, W), request: AttentionRequest | None) -> ViTOutput with class_logits (B, K),
    patch_logits (B, K), cam (B, K, h, w) (detached, ReLU'd), records (AttentionRecords) or None.
    H, W must be multiples of ``patch_size``; the position embedding is interpolated to the grid.
    """

    def __init__(self, num_classes: int, *, mct: bool, img_size: Union[int, Tuple[int, int]] = 224,
                 patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        img_hw = _pair(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size must be a multiple of patch_size={patch_size}, got {img_size}")
        check_backend(attention_backend)
        self.mct = bool(mct)
        self.num_classes = int(num_classes)
        self.num_prefix_tokens = self.num_classes if self.mct else 1
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.depth = int(depth)
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.img_size = img_hw
        self.grid_size = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.attention_backend = attention_backend
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_prefix_tokens, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, embed_dim))
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 .. drop_path
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dpr[i], attention_backend)
                                    for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # MCT: loaded but never applied (docs/semantics.md, "Model")
        if self.mct:
            self.head = nn.Conv2d(embed_dim, self.num_classes, kernel_size=3, stride=1, padding=1)
        else:
            self.head = nn.Conv2d(embed_dim, self.num_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm / DeiT init: trunc normal 0.02 for tokens, pos embed and Linear; LN (1, 0); the conv head keeps
        # PyTorch's default init (official `_init_weights` only touches Linear / LayerNorm).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """Official MCTformer path: {pos_embed} only (class tokens ARE decayed, docs/semantics.md, "Model",
        "Oddities")."""
        return {"pos_embed"} if self.mct else {"pos_embed", "cls_token"}

    # ----------------------------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> Tuple[int, int]:
        """Validate (B, 3, H, W) floating images with H, W multiples of the patch size; return the grid."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor (B, {self.in_chans}, H, W), got {type(images)}")
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must be (B, {self.in_chans}, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating tensor, got dtype {images.dtype}")
        hh, ww = images.shape[-2], images.shape[-1]
        if hh % self.patch_size or ww % self.patch_size or hh == 0 or ww == 0:
            raise ValueError(f"images height and width must be positive multiples of patch_size="
                             f"{self.patch_size}, got {hh}x{ww} (shape {tuple(images.shape)})")
        return hh // self.patch_size, ww // self.patch_size

    def position_embedding(self, grid: Tuple[int, int]) -> Tensor:
        """(1, C + h*w, D): class-token slots kept, patch grid interpolated (docs/semantics.md, "Model")."""
        if grid == self.grid_size:
            return self.pos_embed
        c = self.num_prefix_tokens
        patch_pos = interpolate_patch_pos_embed(self.pos_embed[:, c:], self.grid_size, grid)
        return torch.cat([self.pos_embed[:, :c], patch_pos], dim=1)

    def embed(self, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """images (B, 3, H, W) -> tokens (B, C + P, D) with position embedding, and the grid (h, w)."""
        grid = self.check_images(images)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding(grid), grid

    def forward_features(self, images: Tensor) -> Tensor:
        """Tokens after the last block, before any final norm: (B, C + P, D)."""
        x, _ = self.embed(images)
        for blk in self.blocks:
            x = blk(x, self.num_prefix_tokens, False)[0]
        return x

    def _check_request(self, request: AttentionRequest) -> None:
        for field in ("supervised_layers", "refine_layers", "class_attention_layers"):
            for layer in getattr(request, field):
                if not isinstance(layer, int) or not 0 <= layer < self.depth:
                    raise ValueError(f"request.{field} must hold layer indices in [0, {self.depth}), "
                                     f"got {getattr(request, field)!r}")

    def forward(self, images: Tensor, request: Optional[AttentionRequest] = None,
                qk_hook: Optional[QKHook] = None) -> ViTOutput:
        """images (B, 3, H, W) -> ViTOutput; with ``request`` the records of the requested layers.
        ``qk_hook(layer, q, k) -> (q, k)`` is applied to the supervised layers' q, k before their attention
        consumes them (the caller's hook, e.g. ``aream_fast.losses.deferred.DeferredGrads.attach``)."""
        x, grid = self.embed(images)
        c = self.num_prefix_tokens
        records = None
        if request is not None:
            self._check_request(request)
            supervised = frozenset(request.supervised_layers)
            refine = frozenset(request.refine_layers)
            cls_layers = frozenset(request.class_attention_layers) if c > 1 else frozenset()
            qs: Dict[int, Tensor] = {}
            ks: Dict[int, Tensor] = {}
            cls_sum: Optional[Tensor] = None
            for i, blk in enumerate(self.blocks):
                hook = functools.partial(qk_hook, i) if qk_hook is not None and i in supervised else None
                x, q, k, cls_attn = blk(x, c, i in cls_layers, hook)
                if i in supervised:
                    qs[i], ks[i] = q, k
                elif i in refine:
                    qs[i], ks[i] = q.detach(), k.detach()
                if cls_attn is not None:
                    cls_sum = cls_attn if cls_sum is None else cls_sum + cls_attn
            class_attention = cls_sum / len(cls_layers) if cls_sum is not None else None
            records = AttentionRecords(qs=qs, ks=ks, class_attention=class_attention, num_prefix_tokens=c,
                                       scale=self.blocks[0].attn.scale, grid=grid)
        else:
            for blk in self.blocks:
                x = blk(x, c, False)[0]
        class_logits, patch_logits, cam = self.heads(x, grid)
        return ViTOutput(class_logits, patch_logits, cam, records)

    def heads(self, x: Tensor, grid: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor]:
        """Last-block tokens (B, C + P, D) -> class logits (B, K), patch logits (B, K), cam (B, K, h, w)."""
        c = self.num_prefix_tokens
        b, _, d = x.shape
        if not self.mct:
            x = self.norm(x)
        patches = x[:, c:].transpose(1, 2).reshape(b, d, grid[0], grid[1])
        feature_map = self.head(patches)  # M: (B, K, h, w)
        patch_logits = feature_map.mean(dim=(2, 3))
        if self.mct:
            class_logits = x[:, :c].mean(dim=-1)  # class tokens averaged over the embedding width
        else:
            class_logits = self.head(x[:, 0, :, None, None]).flatten(1)  # the same classifier on the cls token
        cam = F.relu(feature_map).detach()
        return class_logits, patch_logits, cam
