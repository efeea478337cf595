"""OFFICIAL-FORMULATION Conformer (slow, memory-hungry; for tests and benchmarks only).

Follows networks/conformer.py, tools/camutils.py, main_voc_conformer.py and infer_conformer.py of
Jessie459/AReAM (docs/semantics.md, "Conformer", "CAM refinement", "Inference CAMs"): every transformer block
materialises its pre-softmax logits
Z_l = scale q k^T (B, H, N, N), softmaxes them for the value product and returns Z_l; the forward
``torch.stack``s all 12 (L, B, H, N, N, with grad); pseudo labels and inference CAMs softmax that stack again
and build the patch affinity as dense (B, P, P) matrices (docs/semantics.md, "Memory").

The module tree is built with the official three stage loops and the official names, so its state dict is
the one of ``aream_fast.models.conformer.Conformer`` key for key: ``OfficialConformer.from_model`` copies the
weights across. The CNN pieces (``ConvBlock``, ``FCUDown``, ``FCUUp``) have no attention in them and are the
fast model's modules.

Nothing in the library imports this module.

Shapes: B batch, K classes, P = h * w patches (h = H/16), N = 1 + P tokens, H heads, L = 12 layers.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.official.loss import official_affinity_loss, official_seg_to_aff
from aream_fast.official.model import OfficialBlock
from aream_fast.official.pseudo_labels import OfficialPAR, gen_msf_cam, official_cam_to_seg, official_minmax
from aream_fast.pseudo_labels.labels import fuse_segs
from aream_fast.models.conformer import ConvBlock, FCUDown, FCUUp

__all__ = ["OfficialConformer", "official_conformer_gen_msf_cam", "official_conformer_pseudo_affinity", "official_apply_img_box",
           "official_conformer_training_step", "official_conformer_inference_cam"]


class OfficialConvTransBlock(nn.Module):
    """Official ``ConvTransBlock``: forward(x, x_t) -> (x, x_t, Z (B, H, N, N) pre-softmax)."""

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, drop_path: float, last_fusion: bool = False) -> None:
        super().__init__()
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv)
        self.fusion_block = ConvBlock(outplanes, outplanes, stride=1, res_conv=last_fusion)
        self.squeeze_block = FCUDown(outplanes // 4, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, outplanes // 4, dw_stride)
        self.trans_block = OfficialBlock(embed_dim, num_heads, mlp_ratio, drop_path)
        self.dw_stride = dw_stride

    def forward(self, x: Tensor, x_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x, x2 = self.cnn_block(x)
        _, _, H, W = x2.shape
        x_st = self.squeeze_block(x2)
        x_t = torch.cat([x_t[:, :1], x_t[:, 1:] + x_st], dim=1)
        x_t, attn = self.trans_block(x_t)
        x_t_r = self.expand_block(x_t[:, 1:], H // self.dw_stride, W // self.dw_stride)
        x = self.fusion_block(x, x_t_r, return_x_2=False)
        return x, x_t, attn


class OfficialConformer(nn.Module):
    """Official ``Conformer`` (docs/semantics.md, "Conformer"): forward(images (B, 3, H, W)) -> (cnn_logits (B, K),
    att_logits (B, K),
    cam (B, K, h, w) detached not ReLU'd, Z (L, B, H, N, N) stacked pre-softmax logits with grad).

    Note the official output order: the CNN logits come first (the fast model's ``patch_logits``), the
    transformer logits second (its ``class_logits``).
    """

    def __init__(self, num_classes: int, *, patch_size: int = 16, in_chans: int = 3, base_channel: int = 64,
                 channel_ratio: int = 4, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1) -> None:
        super().__init__()
        assert depth % 3 == 0
        self.num_classes = num_classes
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.depth = depth
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path, depth, device="cpu")]
        self.trans_norm = nn.LayerNorm(embed_dim)
        stage_1_channel = base_channel * channel_ratio
        self.cnn_head = nn.Conv2d(stage_1_channel * 4, num_classes, kernel_size=1)
        self.att_head = nn.Linear(embed_dim, num_classes)
        self.conv1 = nn.Conv2d(in_chans, base_channel, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channel)
        self.act1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        trans_dw_stride = patch_size // 4
        self.conv_1 = ConvBlock(base_channel, stage_1_channel, stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(base_channel, embed_dim, kernel_size=trans_dw_stride,
                                          stride=trans_dw_stride)
        self.trans_1 = OfficialBlock(embed_dim, num_heads, mlp_ratio, dpr[0])
        block = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
        init_stage, fin_stage = 2, depth // 3 + 1
        for i in range(init_stage, fin_stage):  # stage 1
            self.add_module(f"conv_trans_{i}", OfficialConvTransBlock(
                stage_1_channel, stage_1_channel, False, 1, trans_dw_stride, drop_path=dpr[i - 1], **block))
        stage_2_channel = stage_1_channel * 2
        init_stage, fin_stage = fin_stage, fin_stage + depth // 3
        for i in range(init_stage, fin_stage):  # stage 2
            first = i == init_stage
            self.add_module(f"conv_trans_{i}", OfficialConvTransBlock(
                stage_1_channel if first else stage_2_channel, stage_2_channel, first, 2 if first else 1,
                trans_dw_stride // 2, drop_path=dpr[i - 1], **block))
        stage_3_channel = stage_2_channel * 2
        init_stage, fin_stage = fin_stage, fin_stage + depth // 3
        for i in range(init_stage, fin_stage):  # stage 3
            first = i == init_stage
            self.add_module(f"conv_trans_{i}", OfficialConvTransBlock(
                stage_2_channel if first else stage_3_channel, stage_3_channel, first, 2 if first else 1,
                trans_dw_stride // 4, drop_path=dpr[i - 1], last_fusion=(i == depth), **block))
        self.fin_stage = fin_stage

    @classmethod
    def from_model(cls, model: nn.Module) -> "OfficialConformer":
        """An official-style copy of a ``aream_fast.models.conformer.Conformer`` (weights, buffers, mode)."""
        blocks = model.transformer_blocks()
        ref = cls(model.num_classes, patch_size=model.patch_size, in_chans=model.in_chans,
                  base_channel=model.conv1.out_channels, channel_ratio=model.conv_1.conv3.out_channels
                  // model.conv1.out_channels, embed_dim=model.embed_dim, depth=model.depth,
                  num_heads=model.num_heads, mlp_ratio=blocks[0].mlp.fc1.out_features / model.embed_dim,
                  drop_path=blocks[-1].drop_path.drop_prob)
        param = next(model.parameters())
        ref = ref.to(device=param.device, dtype=param.dtype)
        ref.load_state_dict(model.state_dict(), strict=True)
        return ref.train(model.training)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        B = x.shape[0]
        attn_list = []
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.conv_1(x_base, return_x_2=False)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = torch.cat([self.cls_token.expand(B, -1, -1), x_t], dim=1)
        x_t, attn = self.trans_1(x_t)
        attn_list.append(attn)
        for i in range(2, self.fin_stage):
            x, x_t, attn = getattr(self, f"conv_trans_{i}")(x, x_t)
            attn_list.append(attn)
        x_t = self.trans_norm(x_t)
        cnn_cam = self.cnn_head(x)
        cnn_out = F.adaptive_avg_pool2d(cnn_cam, 1).view(B, self.num_classes)
        att_out = self.att_head(x_t[:, 0])
        return cnn_out, att_out, cnn_cam.detach(), torch.stack(attn_list, dim=0)


# ------------------------------------------------------------------------------------------------------------
# Pseudo labels with the crop box, the training step, inference CAMs
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def official_conformer_gen_msf_cam(model: OfficialConformer, images: Tensor, *,
                                   scales: Sequence[float] = (0.5, 1.0, 1.5), layer_index: int = 9,
                                   ent_weights: Optional[Tensor] = None) -> Tensor:
    """tools/camutils.py ``gen_msf_cam`` on the one-class-token path (docs/semantics.md, "CAM refinement"): (B, K, H,
    W) in [0, 1]; the one :func:`aream_fast.official.pseudo_labels.gen_msf_cam` with the Conformer defaults.

    Per scale: bilinear resize, batch [x_s; flip(x_s)] (2B images, the model in its current mode: officially
    train, so BN uses the 2B batch statistics), Z (L, 2B, H, N, N) -> softmax -> head mean; no class->patch
    product (C = 1); R = mean over l < layer_index of the [1:, 1:] block ('U'), or (1/layer_index)
    sum_l (1 - e_l) of it ('E', ``ent_weights`` e (L,)); cam' = R cam; upsample; un-flip. Sum, ReLU, per-(b, k)
    min-max. The caller multiplies by the labels.
    """
    weights = None if ent_weights is None else (1.0 - ent_weights[:layer_index]).tolist()
    everything = images.new_ones(images.shape[0], model.num_classes)  # the caller multiplies by the labels
    return gen_msf_cam(model, images, everything, refine_layers=range(layer_index), refine_weights=weights,
                       scales=scales)


def official_apply_img_box(seg: Tensor, img_box: Optional[Tensor], ignore_index: int = 255) -> Tensor:
    """``cam_to_seg`` with ``img_box`` (docs/semantics.md, "Pseudo labels"): only the box [i1:i2, j1:j2] of each image
    is written,
    the rest stays ``ignore_index``. seg (B, H, W); img_box (B, 4) int (i1, i2, j1, j2) or None (unchanged)."""
    if img_box is None:
        return seg
    out = torch.full_like(seg, ignore_index)
    for b in range(seg.shape[0]):
        i1, i2, j1, j2 = (int(v) for v in img_box[b])
        out[b, i1:i2, j1:j2] = seg[b, i1:i2, j1:j2]
    return out


@torch.no_grad()
def official_conformer_pseudo_affinity(model: OfficialConformer, images: Tensor, labels: Tensor, *,
                                       par: OfficialPAR, img_box: Optional[Tensor] = None, layer_index: int = 9,
                                       scales: Sequence[float] = (0.5, 1.0, 1.5), bg_low: float = 0.35,
                                       bg_high: float = 0.55,
                                       ent_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """main_voc_conformer.py's pseudo-label branch: gen_msf_cam (3 scales + flips) x labels -> cam_to_seg
    (score_l, score_h, with img_box) -> fusion -> seg_to_aff. Returns (seg (B, H, W), aff (B, P, P)) int64."""
    cams = official_conformer_gen_msf_cam(model, images, scales=scales, layer_index=layer_index,
                                          ent_weights=ent_weights)
    cams = cams * labels[:, :, None, None]
    seg_l = official_apply_img_box(official_cam_to_seg(par, images, labels, cams, bg_low), img_box)
    seg_h = official_apply_img_box(official_cam_to_seg(par, images, labels, cams, bg_high), img_box)
    seg = fuse_segs(seg_l, seg_h)
    return seg, official_seg_to_aff(seg, patch_size=model.patch_size)


def official_conformer_training_step(model: OfficialConformer, images: Tensor, labels: Tensor, *,
                                     par: OfficialPAR, img_box: Optional[Tensor] = None, layer_index: int = 9,
                                     aream_weight: float = 0.1, aff: Optional[Tensor] = None,
                                     backward: bool = True) -> Dict[str, Tensor]:
    """The loss of one main_voc_conformer.py step after ``cls_epochs``: forward -> L_cls = MLSM(cnn) + MLSM(att)
    -> pseudo affinity from the separate multi-scale forward (unless ``aff`` is given) -> L = L_cls + 0.1 L_aff
    over layers [layer_index, L) -> backward (the caller steps its optimiser). Returns the detached terms."""
    cnn_logits, att_logits, _cam, attn = model(images)
    loss_cls = F.multilabel_soft_margin_loss(cnn_logits, labels) + F.multilabel_soft_margin_loss(att_logits, labels)
    if aff is None:
        _seg, aff = official_conformer_pseudo_affinity(model, images, labels, par=par, img_box=img_box,
                                                       layer_index=layer_index)
    loss_aff = official_affinity_loss(attn, aff, num_prefix_tokens=1,
                                      supervised_layers=range(layer_index, attn.shape[0]))
    loss = loss_cls + aream_weight * loss_aff
    if backward:
        loss.backward()
    return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_aff": loss_aff.detach()}


@torch.no_grad()
def official_conformer_inference_cam(model: OfficialConformer, image: Tensor, labels: Tensor, *,
                                     scales: Sequence[float] = (0.5, 1.0, 1.5)) -> Tuple[np.ndarray, np.ndarray]:
    """infer_conformer.py ``_job`` for one image (docs/semantics.md, "Inference CAMs"), eval mode, dense attention.

    image (3, H, W) normalised; labels (K,). Each scale: the image bicubic-resized to (int(sH), int(sW)) (the
    official code resizes the PIL image; here the tensor is resized with F.interpolate as the fast path does),
    padded right/bottom to a multiple of 16, batched with its flip; cam = raw CNN map of the present classes;
    R = mean over all L layers of mean_h softmax(Z)[1:, 1:]; refine; upsample to the padded size, crop, flip
    back, resize to (H, W). Sum the 2 * len(scales) maps, ReLU, per-class min-max (eps 1e-6).
    Returns (keys int64 (k,), cam float32 (k, H, W)).
    """
    was_training = model.training
    model.eval()
    key = torch.nonzero(labels)[:, 0]
    ori_h, ori_w = image.shape[-2:]
    cam_list = []
    for s in scales:
        size = (int(s * ori_h), int(s * ori_w))
        img = image[None] if size == (ori_h, ori_w) else F.interpolate(image[None], size=size, mode="bicubic",
                                                                        align_corners=False)
        img_h, img_w = img.shape[-2:]
        pad_h, pad_w = int(np.ceil(img_h / 16) * 16), int(np.ceil(img_w / 16) * 16)
        img = F.pad(img, (0, pad_w - img_w, 0, pad_h - img_h), mode="constant")
        img = torch.cat([img, img.flip(-1)], dim=0)
        _, _, cam, att = model(img)
        cam = cam[:, key]
        att = att.softmax(dim=-1).mean(2)  # (L, 2, N, N)
        pat_att = att.mean(0)[:, 1:, 1:]
        b, c, h, w = cam.shape
        cam = torch.einsum("bmn,bcn->bcm", pat_att, cam.reshape(b, c, -1)).reshape(b, c, h, w)
        cam = F.interpolate(cam, size=[pad_h, pad_w], mode="bilinear", align_corners=False)
        cam1 = cam[:1][:, :, :img_h, :img_w]
        cam2 = cam[1:].flip(-1)[:, :, :img_h, :img_w]
        if (img_h, img_w) != (ori_h, ori_w):
            cam1 = F.interpolate(cam1, size=[ori_h, ori_w], mode="bilinear", align_corners=False)
            cam2 = F.interpolate(cam2, size=[ori_h, ori_w], mode="bilinear", align_corners=False)
        cam_list += [cam1, cam2]
    model.train(was_training)
    cam = official_minmax(torch.stack(cam_list, dim=0).sum(dim=0))
    return key.cpu().numpy().astype(np.int64), cam[0].cpu().numpy().astype(np.float32)
