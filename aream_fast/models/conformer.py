"""Conformer-S for WSSS (TransCAM-style AReAM, docs/semantics.md, "Conformer") with attention-statistics export, no N x
N tensor.

A CNN branch and a transformer branch run in parallel and exchange features through the coupling units
(FCU down: 1x1 conv, average pool, LN, GELU, added to the patch tokens; FCU up: 1x1 conv, BN, ReLU, nearest
upsample into the CNN block). One class token, no positional embedding. The module and parameter names are
the official Conformer's (networks/conformer.py of Jessie459/AReAM, which follows pengzhiliang/Conformer):
``cls_token``, ``conv1``, ``bn1``, ``conv_1``, ``trans_patch_conv``, ``trans_1``, ``conv_trans_2`` ..
``conv_trans_12`` (each with ``cnn_block``, ``fusion_block``, ``squeeze_block``, ``expand_block``,
``trans_block``), ``trans_norm``, ``cnn_head``, ``att_head``; so an official checkpoint maps one to one
(``load_conformer_pretrained``).

Transformer layer l (0-based, l = 0..depth-1) is ``trans_1`` for l = 0 and ``conv_trans_{l+1}.trans_block``
otherwise; it runs the fused attention of ``aream_fast.models.attention`` and hands its q, k to the caller when an
``AttentionRequest`` asks for them.

Shapes: B batch, K classes, (H, W) image size (multiples of the patch size 16), (h, w) = (H/16, W/16) token
grid, P = h * w patches, N = 1 + P tokens, D embedding width.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.models.attention import check_backend
from aream_fast.models.pretrained import LoadReport, backbone_coverage, logger, read_state_dict
from aream_fast.models.vit import Block, WSSSViT
from aream_fast.models.records import AttentionRecords, AttentionRequest, ViTOutput

CONV_BN_EPS = 1e-6  # BatchNorm eps in the bottleneck blocks and FCU up (the stem BN keeps PyTorch's 1e-5)


class ConvBlock(nn.Module):
    """Bottleneck 1x1 -> 3x3 (stride) -> 1x1 with BN/ReLU and a residual (official ``ConvBlock``).

    forward(x (B, Cin, H, W), x_t (B, Cout/4, H, W) or None, return_x_2) -> x (B, Cout, H/s, W/s)
    [and x2 (B, Cout/4, H/s, W/s), the 3x3 output]. ``x_t`` (the FCU-up map) is added before the 3x3 conv.
    """

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False) -> None:
        super().__init__()
        med = outplanes // 4
        self.conv1 = nn.Conv2d(inplanes, med, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(med, eps=CONV_BN_EPS)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(med, med, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(med, eps=CONV_BN_EPS)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(med, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes, eps=CONV_BN_EPS)
        self.act3 = nn.ReLU()
        self.res_conv = bool(res_conv)
        if self.res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False)
            self.residual_bn = nn.BatchNorm2d(outplanes, eps=CONV_BN_EPS)

    def forward(self, x: Tensor, x_t: Optional[Tensor] = None, return_x_2: bool = True):
        residual = x
        y = self.act1(self.bn1(self.conv1(x)))
        x2 = self.act2(self.bn2(self.conv2(y if x_t is None else y + x_t)))
        y = self.bn3(self.conv3(x2))
        if self.res_conv:
            residual = self.residual_bn(self.residual_conv(residual))
        y = self.act3(y + residual)
        return (y, x2) if return_x_2 else y


class FCUDown(nn.Module):
    """CNN map -> patch-token update: 1x1 conv, avg-pool by ``dw_stride``, LN (eps 1e-6), GELU.

    forward(x (B, Cin, h*s, w*s)) -> (B, h*w, D), row-major.
    """

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int) -> None:
        super().__init__()
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = nn.LayerNorm(outplanes, eps=1e-6)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)
        return self.act(self.ln(x))


class FCUUp(nn.Module):
    """Patch tokens -> CNN map: 1x1 conv, BN (eps 1e-6), ReLU, nearest upsample by ``up_stride``.

    forward(x (B, h*w, D), h, w) -> (B, Cout, h*s, w*s).
    """

    def __init__(self, inplanes: int, outplanes: int, up_stride: int) -> None:
        super().__init__()
        self.up_stride = int(up_stride)
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1)
        self.bn = nn.BatchNorm2d(outplanes, eps=CONV_BN_EPS)
        self.act = nn.ReLU()

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, d = x.shape
        if n != h * w:
            raise ValueError(f"FCUUp: {n} tokens do not fill a {h}x{w} grid")
        x = self.act(self.bn(self.conv_project(x.transpose(1, 2).reshape(b, d, h, w))))
        return F.interpolate(x, size=(h * self.up_stride, w * self.up_stride), mode="nearest")


class ConvTransBlock(nn.Module):
    """One Conformer stage step: CNN bottleneck, FCU down into the tokens, transformer block, FCU up, fusion.

    forward(x (B, Cin, ., .), x_t (B, N, D), layer inputs of ``Block``) -> (x (B, Cout, ., .), x_t (B, N, D),
    q, k (B, H, N, d)).
    """

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, drop_path: float, last_fusion: bool, backend: str) -> None:
        super().__init__()
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv)
        self.fusion_block = ConvBlock(outplanes, outplanes, stride=1, res_conv=last_fusion)
        self.squeeze_block = FCUDown(outplanes // 4, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, outplanes // 4, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, drop_path, backend)
        self.dw_stride = int(dw_stride)

    def cnn_to_tokens(self, x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """CNN bottleneck and FCU down: returns (x, x2, tokens with the patch part updated)."""
        x, x2 = self.cnn_block(x)
        x_t = torch.cat([x_t[:, :1], x_t[:, 1:] + self.squeeze_block(x2)], dim=1)
        return x, x2, x_t

    def tokens_to_cnn(self, x: Tensor, x2: Tensor, x_t: Tensor) -> Tensor:
        """FCU up of the patch tokens into the fusion block."""
        h, w = x2.shape[-2] // self.dw_stride, x2.shape[-1] // self.dw_stride
        return self.fusion_block(x, self.expand_block(x_t[:, 1:], h, w), return_x_2=False)

    def forward(self, x: Tensor, x_t: Tensor, class_attention: bool = False, qk_hook=None):
        x, x2, x_t = self.cnn_to_tokens(x, x_t)
        x_t, q, k, _ = self.trans_block(x_t, 1, class_attention, qk_hook)
        return self.tokens_to_cnn(x, x2, x_t), x_t, q, k


class Conformer(nn.Module):
    """Conformer with one class token and no positional embedding, exporting O(N d) attention statistics.

    forward(images (B, 3, H, W), request: AttentionRequest | None) -> ViTOutput with
      * class_logits (B, K): the **transformer** branch, ``att_head`` on the ``trans_norm``-ed class token
        (official ``att_logits``);
      * patch_logits (B, K): the **CNN** branch, global average pool of the ``cnn_head`` map (official
        ``cnn_logits``); both go into the classification loss, as in main_voc_conformer.py;
      * cam (B, K, h, w): the ``cnn_head`` map, detached and **not** ReLU'd (official);
      * records: the requested layers' q, k (supervised layers with grad, refine layers detached),
        class_attention None (one class token: no class->patch product), num_prefix_tokens 1, or None.
    H and W must be multiples of ``patch_size`` (16): the CNN map then ends on the token grid.

    Architecture (official ``Conformer``; Conformer-S = base_channel 64, channel_ratio 4, embed_dim 384, depth
    12, num_heads 6): ``base_channel`` is also the stem width (the official code hard-codes 64 = base_channel);
    tiny test models shrink base_channel / channel_ratio / embed_dim. depth must be a multiple of 3.
    img_size: the training crop (H, W), kept as ``img_size`` for scripts that read it; nothing depends on it
    (no position embedding: any multiple of 16 runs).
    """

    def __init__(self, num_classes: int, *, patch_size: int = 16, in_chans: int = 3, base_channel: int = 64,
                 channel_ratio: int = 4, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1, attention_backend: str = "auto",
                 img_size: Union[int, Tuple[int, int]] = 384) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if depth < 3 or depth % 3:
            raise ValueError(f"depth must be a positive multiple of 3, got {depth}")
        if patch_size != 16:
            raise ValueError(f"patch_size must be 16 (the CNN map ends at stride 16, on the token grid), "
                             f"got {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        check_backend(attention_backend)
        self.num_classes = int(num_classes)
        self.num_prefix_tokens = 1
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.attention_backend = attention_backend
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        stage_1 = base_channel * channel_ratio
        stage_2, stage_3 = 2 * stage_1, 4 * stage_1
        dw = patch_size // 4
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # = torch.linspace(0, drop_path, depth)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.trans_norm = nn.LayerNorm(embed_dim)  # PyTorch's default eps 1e-5, as the official code
        self.cnn_head = nn.Conv2d(stage_3, self.num_classes, kernel_size=1)
        self.att_head = nn.Linear(embed_dim, self.num_classes)
        self.conv1 = nn.Conv2d(in_chans, base_channel, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channel)
        self.act1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.conv_1 = ConvBlock(base_channel, stage_1, stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(base_channel, embed_dim, kernel_size=dw, stride=dw)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, dpr[0], attention_backend)
        third = depth // 3
        for i in range(2, depth + 1):
            stage = (i - 2 + 1) // third  # i = 2..third+1 -> 0; the next third -> 1; the last third -> 2
            first = i in (third + 1, 2 * third + 1)  # the first block of stages 2 and 3 halves the CNN map
            out_ch = (stage_1, stage_2, stage_3)[stage]
            in_ch = (stage_1, stage_1, stage_2)[stage] if first else out_ch
            self.add_module(f"conv_trans_{i}", ConvTransBlock(
                in_ch, out_ch, res_conv=first, stride=2 if first else 1, dw_stride=dw >> stage,
                embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=dpr[i - 1],
                last_fusion=(i == depth), backend=attention_backend))
        self._init_weights()

    def _init_weights(self) -> None:
        # official: trunc normal 0.02 (cls_token, Linear; bias 0), LN (1, 0), Conv2d kaiming normal fan_out
        # (bias left at PyTorch's default), BN (1, 0). Meta tensors (shape-only builds) hold no values.
        if self.cls_token.is_meta:
            return
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def no_weight_decay(self) -> set:
        """Official: {cls_token} (1-D parameters and biases are exempt by the optimiser's own rule)."""
        return {"cls_token"}

    def conv_trans(self, i: int) -> ConvTransBlock:
        """``conv_trans_i`` (i = 2..depth): the block of transformer layer i - 1."""
        return getattr(self, f"conv_trans_{i}")

    def transformer_blocks(self) -> List[Block]:
        """The ``depth`` transformer blocks in layer order (layer 0 = ``trans_1``)."""
        return [self.trans_1] + [self.conv_trans(i).trans_block for i in range(2, self.depth + 1)]

    # ----------------------------------------------------------------------------------------------------
    # (B, 3, H, W) floating, H and W positive multiples of patch_size -> (h, w); the ViT's checks
    check_images = WSSSViT.check_images

    def stem(self, images: Tensor) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
        """images -> (CNN map after ``conv_1`` (B, stage_1, H/4, W/4), tokens (B, N, D) before ``trans_1``,
        grid (h, w))."""
        grid = self.check_images(images)
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(images))))
        x = self.conv_1(x_base, return_x_2=False)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = torch.cat([self.cls_token.expand(x_t.shape[0], -1, -1), x_t], dim=1)
        return x, x_t, grid

    def heads(self, x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Last CNN map (B, stage_3, h, w) and tokens (B, N, D) -> (att_logits, cnn_logits, cam (B, K, h, w))."""
        cnn_cam = self.cnn_head(x)
        cnn_logits = cnn_cam.mean(dim=(2, 3))
        att_logits = self.att_head(self.trans_norm(x_t)[:, 0])
        return att_logits, cnn_logits, cnn_cam.detach()

    _check_request = WSSSViT._check_request  # layer indices in [0, depth)

    def forward(self, images: Tensor, request: Optional[AttentionRequest] = None,
                qk_hook: Optional[QKHook] = None) -> ViTOutput:
        """images (B, 3, H, W) -> ViTOutput. ``qk_hook(layer, q, k) -> (q, k)`` is applied to the supervised
        layers' q, k before their attention consumes them (e.g. ``DeferredGrads.attach``)."""
        x, x_t, grid = self.stem(images)
        supervised = frozenset(request.supervised_layers) if request is not None else frozenset()
        refine = frozenset(request.refine_layers) if request is not None else frozenset()
        if request is not None:
            self._check_request(request)
        qs: Dict[int, Tensor] = {}
        ks: Dict[int, Tensor] = {}

        def keep(layer: int, q: Tensor, k: Tensor) -> None:
            if layer in supervised:
                qs[layer], ks[layer] = q, k
            elif layer in refine:
                qs[layer], ks[layer] = q.detach(), k.detach()

        def hook(layer: int):
            return functools.partial(qk_hook, layer) if qk_hook is not None and layer in supervised else None

        x_t, q, k, _ = self.trans_1(x_t, 1, False, hook(0))
        keep(0, q, k)
        for i in range(2, self.depth + 1):
            x, x_t, q, k = self.conv_trans(i)(x, x_t, False, hook(i - 1))
            keep(i - 1, q, k)
        if x.shape[-2:] != grid:
            raise RuntimeError(f"the CNN map {tuple(x.shape[-2:])} is off the token grid {grid}")
        class_logits, patch_logits, cam = self.heads(x, x_t)
        records = None
        if request is not None:
            records = AttentionRecords(qs=qs, ks=ks, class_attention=None, num_prefix_tokens=1,
                                       scale=self.trans_1.attn.scale, grid=grid)
        return ViTOutput(class_logits, patch_logits, cam, records)


# ------------------------------------------------------------------------------------------------------------
# Loading an ImageNet Conformer checkpoint (docs/semantics.md, "Conformer" "Pretrained weights")
# ------------------------------------------------------------------------------------------------------------


def load_conformer_pretrained(model: Conformer, path: Union[str, os.PathLike], *,
                              allow_partial: bool = False) -> LoadReport:
    """Load a local Conformer checkpoint in the official layout (e.g. ImageNet ``conformer_small``).

    Official rule (main_voc_conformer.py): every key containing "head" is dropped (``conv_cls_head``,
    ``trans_cls_head`` of ImageNet; ``cnn_head``/``att_head`` are new), the rest is loaded with strict=False,
    missing / unexpected keys are reported (returned and logged). Raises FileNotFoundError for a missing file,
    ValueError naming the file for a corrupt file, a parameter whose shape differs from the model's (wrong
    width or depth), or a file that holds fewer than half of the model's non-head parameters (not a Conformer
    checkpoint, e.g. a DeiT one).
    """
    path = os.fspath(path)
    state = read_state_dict(path)
    dropped = sorted(k for k in state if "head" in k)
    state = {k: v for k, v in state.items() if "head" not in k}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(own[key].shape)} in the model (wrong Conformer architecture?)")
    loaded, backbone = backbone_coverage(own, state, lambda k: "head" in k)
    report = LoadReport(path=path, missing_keys=[k for k in own if k not in state],
                        unexpected_keys=[k for k in state if k not in own], dropped_keys=dropped, adapted_keys=[],
                        loaded=loaded, backbone=backbone)
    if not allow_partial and 2 * loaded < backbone:
        raise ValueError(f"{path!r} holds only {loaded} of the model's {backbone} non-head Conformer "
                         f"parameters: not a Conformer checkpoint of this architecture (pass "
                         f"--allow-partial-pretrained to load it anyway)")
    model.load_state_dict(state, strict=False)
    logger.info("loaded %s: missing keys %s, unexpected keys %s, dropped %s", path, report.missing_keys,
                report.unexpected_keys, dropped)
    return report
