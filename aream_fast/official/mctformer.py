"""The official AReAM formulation, written out as a baseline for benchmarks and parity tests.

This module re-implements, on purpose, everything the official code (Jessie459/AReAM, HEAD ``fe708c3``) does
that makes it slow and memory hungry, so that ``benchmarks/`` and ``benchmarks/profile_memory.py`` can measure our
fused path against it side by side (spec: /work/shared/reference/aream_official_spec.md, referred to as "spec"):

* :class:`OfficialMCTformerV2` -- MCTformer-V2 whose eager attention blocks return their **pre-softmax** logits
  Z_l (B, H, N, N); the forward ``torch.stack``s all L of them (L, B, H, N, N), with grad (spec §1.1, §9 #1-#3).
  Its state-dict keys are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv`` ...,
  ``head`` a 3x3 conv), so it loads the weights of ``aream_fast.models.build_model("mct_deit_small", ...)``:
  see :meth:`OfficialMCTformerV2.from_model`.
* :func:`official_gen_msf_cam` -- the pseudo-label CAMs from a **separate** forward of 2B images (image + flip)
  that materialises L x 2B x H x N x N, its softmax and head mean (spec §3.1, §9 #7-#10).
* :class:`OfficialPAR`, :func:`official_cam_to_seg` -- PAR with its (B, M, 48, h, w) neighbour stacks, run in a
  per-image Python loop, once per background score (spec §3.2, §3.3).
* :func:`official_seg_to_aff` -- the (B, P, P) int64 pseudo affinity with 255 = ignore (spec §3.4, §9 #11).
* :func:`official_affinity_loss` -- sigmoid of the head-mean pre-softmax logits on the patch block, linear pos/neg
  penalty with batch-global counts + 1 over the (B, P, P) masks (spec §2, ``losses.py``).
* :func:`official_training_step` -- one full training step (forward, classification losses, pseudo labels, AReAM
  loss, backward, optimizer step) as in ``main_voc_mctformer.py`` lines ~246-285 (spec §2).

Nothing here is used by the fast path. Only tests and benchmarks import it.

Shapes: B batch, C = K class tokens (MCTformer), P = h * w patches, N = C + P tokens, H heads, d head width,
L blocks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OfficialAttention",
    "OfficialBlock",
    "OfficialMCTformerV2",
    "OfficialPAR",
    "official_gen_msf_cam",
    "official_cam_to_seg",
    "official_fuse_segs",
    "official_seg_to_aff",
    "official_affinity_loss",
    "official_pseudo_affinity",
    "official_training_step",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Model (spec §1.1; networks/vision_transformer.py + networks/mctformer.py of the official repo)
# ---------------------------------------------------------------------------------------------------------------


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
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, d)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # Z: (B, H, N, N), pre-softmax
        weights = attn.softmax(dim=-1)  # (B, H, N, N), saved for backward
        out = (weights @ v).transpose(1, 2).reshape(B, N, D)
        return self.proj(out), attn


class OfficialMlp(nn.Module):
    """timm ``Mlp`` (keys ``fc1``, ``fc2``), GELU, no dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OfficialDropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``): identity in eval mode or with rate 0."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class OfficialBlock(nn.Module):
    """Pre-norm block: x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x))). Returns (x, Z (B, H, N, N))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OfficialAttention(dim, num_heads)
        self.drop_path = OfficialDropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = OfficialMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        o, z = self.attn(self.norm1(x))
        x = x + self.drop_path(o)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, z


class _PatchEmbed(nn.Module):
    """timm ``PatchEmbed`` (key ``proj``): Conv2d(3, D, p, stride p), flattened row-major to (B, P, D)."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialMCTformerV2(nn.Module):
    """MCTformer-V2 as in the official AReAM code (spec §1.1), eager attention, every block's Z returned.

    forward(images (B, 3, H, W)) -> (class_logits (B, K), patch_logits (B, K), cam (B, K, h, w) ReLU'd and
    detached, Z (L, B, H, N, N) pre-softmax logits of every block, stacked, with grad).

    The final ``norm`` exists (and is loaded) but is never applied, as in the official code.
    """

    def __init__(self, num_classes: int, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.1):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.num_classes = num_classes
        self.num_prefix_tokens = num_classes
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        g = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + g * g, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList(OfficialBlock(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # loaded, never applied (spec §1.1)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=3, stride=1, padding=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official _init_weights touches Linear and LayerNorm only (the conv head keeps PyTorch's default init)
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

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
        resized by bicubic with the DINO scale factors ((h + 0.1) / g0, (w + 0.1) / g0) (spec §1.1)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Pseudo labels (spec §3; tools/camutils.py, networks/PAR.py)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def official_gen_msf_cam(model: OfficialMCTformerV2, images: Tensor, *, scales: Sequence[float] = (1.0,),
                         layer_index: int = 7, ent_weights: Optional[Tensor] = None) -> Tensor:
    """``gen_msf_cam`` (spec §3.1): CAMs (B, K, H, W) in [0, 1] from a separate forward of [x_s; flip(x_s)].

    Materialises, per scale, Z (L, 2B, H, N, N), its softmax (same size) and the head mean (L, 2B, N, N).
    ``ent_weights``: None for 'U' (uniform), else e (L,) for 'E' (refinement weights 1 - e_l, not
    renormalised). The caller multiplies by the labels. Runs in whatever mode ``model`` is in (official: train).
    """
    B, _, H, W = images.shape
    C = model.num_prefix_tokens
    cam_list = []
    for s in scales:
        if s != 1.0:
            x_s = F.interpolate(images, size=(int(s * H), int(s * W)), mode="bilinear", align_corners=False)
        else:
            x_s = images
        x_s = torch.cat([x_s, x_s.flip(-1)], dim=0)  # (2B, 3, h_s, w_s)
        _, _, cam, attn_weights = model(x_s)  # cam (2B, K, h, w); Z (L, 2B, H, N, N)
        h, w = cam.shape[-2:]
        attn_weights = attn_weights.softmax(dim=-1).mean(dim=2)  # (L, 2B, N, N), head mean of the softmax
        if C > 1:
            cls_attn = attn_weights[:, :, :C, C:].mean(0)  # (2B, K, P), mean over all layers
            cam = cam * cls_attn.reshape(cam.shape)
        if ent_weights is None:
            patch_attn = attn_weights[:layer_index, :, C:, C:].mean(0)  # (2B, P, P)
        else:
            wts = (1.0 - ent_weights[:layer_index]).to(attn_weights)
            patch_attn = (attn_weights[:layer_index, :, C:, C:] * wts.view(-1, 1, 1, 1)).sum(0) / layer_index
        n = cam.shape[0]
        cam = torch.bmm(patch_attn, cam.reshape(n, C, -1).transpose(1, 2)).transpose(1, 2).reshape(n, C, h, w)
        cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
        cam_list.append(cam[:B] + cam[B:].flip(-1))
    cams = torch.sum(torch.stack(cam_list, dim=0), dim=0)
    cams = F.relu(cams)
    cams = cams - cams.flatten(2).min(-1)[0][..., None, None]
    cams = cams / (cams.flatten(2).max(-1)[0][..., None, None] + 1e-6)
    return cams


def _par_kernel() -> Tensor:
    """(8, 1, 3, 3) one-hot kernels picking the 8 neighbours in row-major order (official ``get_kernel``)."""
    weight = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        weight[i, 0, r, c] = 1.0
    return weight


class OfficialPAR(nn.Module):
    """Pixel-adaptive refinement as the official ``networks/PAR.py`` computes it (spec §3.3).

    forward(images (B, 3, h, w), masks (B, M, h, w)) -> (B, M, h, w). Builds the (B, M, 48, h, w) neighbour
    stack on every one of the ``num_iters`` iterations; replicate padding; no self term; weights not
    renormalised.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iters: int = 10,
                 w1: float = 0.3, w2: float = 0.01):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iters = int(num_iters)
        self.w1 = w1
        self.w2 = w2
        self.register_buffer("kernel", _par_kernel(), persistent=False)
        ker = torch.ones(1, 1, 8, 1, 1)
        for i in (0, 2, 5, 7):  # diagonal neighbours are d * sqrt(2) away
            ker[0, 0, i] = math.sqrt(2.0)
        self.register_buffer("pos", torch.cat([ker * d for d in self.dilations], dim=2), persistent=False)

    def get_dilated_neighbors(self, x: Tensor) -> Tensor:
        """(b, c, h, w) -> (b, c, 8 * len(dilations), h, w) neighbour values, replicate padding."""
        b, c, h, w = x.shape
        x_aff = []
        for d in self.dilations:
            x_pad = F.pad(x, [d] * 4, mode="replicate")
            x_pad = x_pad.reshape(b * c, -1, x_pad.shape[-2], x_pad.shape[-1])
            x_aff.append(F.conv2d(x_pad, self.kernel.to(x), dilation=d).view(b, c, -1, h, w))
        return torch.cat(x_aff, dim=2)

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        b, c, h, w = images.shape
        _imgs = self.get_dilated_neighbors(images)  # (b, 3, 48, h, w)
        _pos = self.pos.to(_imgs)
        _imgs_rep = images.unsqueeze(2).repeat(1, 1, _imgs.shape[2], 1, 1)
        _pos_rep = _pos.repeat(b, 1, 1, h, w)
        _imgs_abs = torch.abs(_imgs - _imgs_rep)
        _imgs_std = torch.std(_imgs, dim=2, keepdim=True)
        _pos_std = torch.std(_pos_rep, dim=2, keepdim=True)
        aff = -(_imgs_abs / (_imgs_std + 1e-8) / self.w1) ** 2
        aff = aff.mean(dim=1, keepdim=True)  # (b, 1, 48, h, w)
        pos_aff = -(_pos_rep / (_pos_std + 1e-8) / self.w1) ** 2
        aff = F.softmax(aff, dim=2) + self.w2 * F.softmax(pos_aff, dim=2)
        for _ in range(self.num_iters):
            _masks = self.get_dilated_neighbors(masks)  # (b, M, 48, h, w)
            masks = (_masks * aff).sum(2)
        return masks


def _denormalize(images: Tensor) -> Tensor:
    """ImageNet-normalised (B, 3, H, W) -> 0..255 pixel values."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * std + mean) * 255.0


@torch.no_grad()
def official_cam_to_seg(par: OfficialPAR, images: Tensor, labels: Tensor, cams: Tensor, score: float) -> Tensor:
    """``cam_to_seg`` (spec §3.2) without ``img_box``: (B, H, W) int64 in {0 (bg), k + 1 (class k)}.

    images (B, 3, H, W) normalised; labels (B, K) multi-hot; cams (B, K, H, W) in [0, 1]; ``score`` the constant
    background channel. PAR runs at half resolution in a per-image Python loop over the present channels.
    """
    b, c, h, w = cams.shape
    img = _denormalize(images)
    cams = F.pad(cams, (0, 0, 0, 0, 1, 0), value=score)  # (B, K + 1, H, W), channel 0 = background
    keys_all = F.pad(labels, (1, 0), value=1.0)  # (B, K + 1)
    img = F.interpolate(img, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
    cams = F.interpolate(cams, size=(h // 2, w // 2), mode="bilinear", align_corners=False)
    seg = torch.full((b, h, w), 255, dtype=torch.long, device=cams.device)
    for i in range(b):
        keys = torch.nonzero(keys_all[i])[:, 0]
        valid_cam = cams[i, keys].unsqueeze(0).softmax(dim=1)  # softmax over bg + present classes
        valid_cam = par(img[i].unsqueeze(0), valid_cam)
        valid_cam = F.interpolate(valid_cam, size=(h, w), mode="bilinear", align_corners=False)
        seg[i] = keys[valid_cam.argmax(dim=1)[0]]
    return seg


def official_fuse_segs(seg_l: Tensor, seg_h: Tensor, ignore_index: int = 255) -> Tensor:
    """Fusion of the low/high background-score segmentations (spec §3.2): fg from seg_h, bg only where both say
    bg, ignore where seg_h says bg and seg_l says fg. (B, H, W) int64 each."""
    seg = seg_h.clone()
    seg[seg_h == 0] = ignore_index
    seg[(seg_h == 0) & (seg_l == 0)] = 0
    return seg


def official_seg_to_aff(seg: Tensor, patch_size: int = 16, ignore_index: int = 255) -> Tensor:
    """``seg_to_aff`` (spec §3.4): (B, H, W) -> (B, P, P) int64 pseudo affinity, 1 same / 0 different /
    ``ignore_index`` where either patch is ignored. Patch label = the pixel at (16 i, 16 j) (legacy nearest)."""
    b, H, W = seg.shape
    seg = F.interpolate(seg.unsqueeze(1).float(), size=(H // patch_size, W // patch_size), mode="nearest")
    seg = seg.reshape(b, 1, -1)  # (B, 1, P)
    P = seg.shape[-1]
    seg_rep = seg.repeat(1, P, 1)  # (B, P, P) float
    aff = (seg_rep == seg_rep.transpose(1, 2)).long()
    ign = (seg.squeeze(1) == ignore_index)  # (B, P)
    for i in range(b):
        aff[i, :, ign[i]] = ignore_index
        aff[i, ign[i], :] = ignore_index
    return aff


@torch.no_grad()
def official_pseudo_affinity(model: OfficialMCTformerV2, images: Tensor, labels: Tensor, *,
                             par: OfficialPAR, layer_index: int = 7, scales: Sequence[float] = (1.0,),
                             bg_low: float = 0.35, bg_high: float = 0.55,
                             ent_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The whole official pseudo-label branch: gen_msf_cam x labels -> cam_to_seg twice -> fuse -> seg_to_aff.

    Returns (seg (B, H, W) int64, aff (B, P, P) int64)."""
    cams = official_gen_msf_cam(model, images, scales=scales, layer_index=layer_index, ent_weights=ent_weights)
    cams = cams * labels[:, :, None, None]
    seg_l = official_cam_to_seg(par, images, labels, cams, bg_low)
    seg_h = official_cam_to_seg(par, images, labels, cams, bg_high)
    seg = official_fuse_segs(seg_l, seg_h)
    return seg, official_seg_to_aff(seg, patch_size=model.patch_size)


# ---------------------------------------------------------------------------------------------------------------
# Loss (spec §2; losses.py of the official repo)
# ---------------------------------------------------------------------------------------------------------------


def _official_aff_loss_one(attn: Tensor, aff: Tensor) -> Tensor:
    """One layer: attn (B, P, P) = sigmoid(head-mean Z) on the patch block; aff (B, P, P) in {0, 1, 255}."""
    pos_label = (aff == 1).to(torch.int32)
    neg_label = (aff == 0).to(torch.int32)
    pos_count = pos_label.sum() + 1
    neg_count = neg_label.sum() + 1
    pos_loss = torch.sum(pos_label * (1 - attn)) / pos_count
    neg_loss = torch.sum(neg_label * attn) / neg_count
    return 0.5 * pos_loss + 0.5 * neg_loss


def official_affinity_loss(attn_logits: Tensor, aff: Tensor, *, num_prefix_tokens: int,
                           supervised_layers: Sequence[int], layer_weights: Optional[Tensor] = None) -> Tensor:
    """L_aff = mean over l in ``supervised_layers`` of w_l * L_aff,l (spec §2).

    attn_logits: (L, B, H, N, N) stacked pre-softmax logits (or any indexable over layers);
    aff: (B, P, P) from :func:`official_seg_to_aff`; layer_weights: None (uniform) or (len(supervised_layers),)
    e_l, not renormalised.
    """
    C = num_prefix_tokens
    if len(supervised_layers) == 0:
        raise ValueError("supervised_layers must not be empty")
    total = attn_logits.new_zeros(())
    for j, l in enumerate(supervised_layers):
        s = torch.sigmoid(attn_logits[l].mean(dim=1)[:, C:, C:])  # (B, P, P)
        term = _official_aff_loss_one(s, aff)
        if layer_weights is not None:
            term = term * layer_weights[j]
        total = total + term
    return total / len(supervised_layers)


# ---------------------------------------------------------------------------------------------------------------
# One training step (spec §2; main_voc_mctformer.py ~246-285)
# ---------------------------------------------------------------------------------------------------------------


def official_training_step(model: OfficialMCTformerV2, optimizer: Optional[torch.optim.Optimizer], images: Tensor,
                           labels: Tensor, *, par: OfficialPAR, supervised_layers: Sequence[int] = (7, 8, 9, 10, 11),
                           aream_weight: float = 0.1, aff: Optional[Tensor] = None,
                           backward: bool = True) -> Dict[str, Tensor]:
    """forward -> L_cls -> pseudo affinity from a separate no-grad forward (unless ``aff`` is given) ->
    L = L_cls + 0.1 L_aff -> backward -> optimizer step. Returns the (detached) loss terms.

    ``supervised_layers`` must be the deep layers [layer_index, L): the refinement uses the layers before the
    first of them, as in the official code.
    """
    layer_index = min(supervised_layers)
    class_logits, patch_logits, _cam, attn_logits = model(images)
    loss_cls = F.multilabel_soft_margin_loss(class_logits, labels) + F.multilabel_soft_margin_loss(patch_logits,
                                                                                                   labels)
    if aff is None:
        _seg, aff = official_pseudo_affinity(model, images, labels, par=par, layer_index=layer_index)
    loss_aff = official_affinity_loss(attn_logits, aff, num_prefix_tokens=model.num_prefix_tokens,
                                      supervised_layers=supervised_layers)
    loss = loss_cls + aream_weight * loss_aff
    if backward:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_aff": loss_aff.detach()}
