"""Segmentation networks of stage two: a ViT segmenter and a DeepLab comparator on a dilated ResNet-101.

    from aream_fast.stage2 import build_seg_model, SEG_MODELS
    model = build_seg_model("vit_small_aspp", 21, pretrained="deit_small_patch16_224.pth")
    logits = model(images)            # (B, 3, H, W) of any size -> (B, 21, H, W)

Names (``SEG_MODELS``, default first):

* ``vit_small_aspp`` (the default) / ``vit_small_largefov`` / ``vit_base_aspp`` / ``vit_base_largefov``: the
  project's single-class-token ViT (``aream_fast.models.vit.WSSSViT``, timm keys; ViT-S/DeiT-S 384-d or ViT-B/DeiT-B
  768-d) on the stride-16 patch grid, with a DeepLab-LargeFOV head (ToCo's ``LargeFOV``: two 3x3 convolutions
  of dilation 5 with ReLU and dropout, then a 1x1 classifier) or a DeepLabV2 ASPP head (SeCo's: four 3x3
  classifiers of dilations 6/12/18/24, summed). ``feature_layers`` feeds the head several blocks: their patch
  tokens, each layer-normed, are concatenated along channels (the last block goes through the backbone's own
  final ``norm``, so a DeiT checkpoint's ``norm`` is used). Images whose sides are not multiples of 16 are
  zero-padded (zero = the ImageNet mean after normalisation) and the logits cropped back.
* ``deeplabv2_resnet101`` (ASPP 6/12/18/24 summed, as DeepLabV2) and ``deeplabv3_resnet101`` (torchvision's
  ``DeepLabHead``: ASPP 12/24/36 + image pooling): torchvision ResNet-101 with strides of layer3/layer4 replaced
  by dilation (output stride 8). ``pretrained`` is a local ImageNet ResNet-101 classifier (torchvision or timm
  keys: ``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc`` dropped). torchvision's
  ``COCO_WITH_VOC_LABELS_V1`` segmentation weights (and any other segmentation checkpoint) are refused: they
  were trained with VOC-class masks, i.e. the labels a WSSS method must not see.

Every model's logits are bilinearly upsampled (align_corners False) to the input size.

Default head: ASPP (measured; benchmarks/RESULTS.md "Stage two: segmentation models"). Same small ViT
(192-d, 6 blocks, from scratch), same seed, data order and 150 AdamW steps on the synthetic train split with
its ground-truth masks (benchmarks/seg_head_compare.py): ASPP reached 21.6 val mIoU (loss 0.46) while LargeFOV
had not left the all-background solution (12.4, loss 0.62). On ViT-S with 21 classes ASPP's head has 0.29 M
parameters instead of 4.1 M (4.3 vs 5.1 GMAC per 224 px image), and in benchmarks/test_bench_seg.py it trains and
runs MS + flip inference faster on this CPU. This is a short,
one-seed, from-scratch run, not a VOC result: the peers reach good numbers with both heads on pretrained ViTs
(ToCo, rulixiang/ToCo: LargeFOV, 69.2 VOC val without post-processing; SeCo, zwyang6/SeCo: ASPP, 72.2);
LargeFOV stays available by name.

Checkpoint format (written by :func:`save_seg_checkpoint`, read by :func:`load_seg_model`; the seg trainer
writes the same two keys, it may add others)::

    {"model": state_dict, "seg_model": {"name": str, "num_classes": int, **build kwargs (without pretrained)}}
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aream_fast.models.factory import MODEL_CONFIGS
from aream_fast.models.pretrained import adapt_state_dict, read_state_dict
from aream_fast.models.vit import WSSSViT

PathLike = Union[str, os.PathLike]

_VIT = {"vit_small_aspp": ("vit_small", "aspp"), "vit_small_largefov": ("vit_small", "largefov"),
        "vit_base_aspp": ("vit_base", "aspp"), "vit_base_largefov": ("vit_base", "largefov")}
_RESNET = {"deeplabv2_resnet101": "aspp_v2", "deeplabv3_resnet101": "deeplabv3"}
SEG_MODELS: Tuple[str, ...] = tuple(_VIT) + tuple(_RESNET)

_VIT_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")
_RESNET_OVERRIDES = ("layers",)


# ---------------------------------------------------------------------------------------------------- heads
class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: conv3x3(d) -> ReLU -> dropout -> conv3x3(d) -> ReLU -> dropout -> conv1x1.
    (B, C_in, h, w) -> (B, num_classes, h, w). ToCo uses 512 channels, dilation 5 on ViT tokens."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.conv6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv7 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(F.relu(self.conv6(x)))
        x = self.dropout(F.relu(self.conv7(x)))
        return self.classifier(x)


class ASPPv2(nn.Module):
    """DeepLabV2 ASPP: sum over rates r of conv3x3(dilation r) classifiers. (B, C_in, h, w) -> (B, K, h, w).
    Weights N(0, 0.01), bias 0, as DeepLabV2 (kazuto1011/deeplab-pytorch ``_ASPP``)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r)
                                      for r in self.rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self.branches)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor, got dtype {images.dtype}")
    if images.shape[-1] == 0 or images.shape[-2] == 0:
        raise ValueError(f"images must have a positive height and width, got shape {tuple(images.shape)}")


# ---------------------------------------------------------------------------------------------------- ViT
class ViTSegmenter(nn.Module):
    """ViT backbone (``WSSSViT``, one cls token) + LargeFOV / ASPP head on the patch grid.

    forward(images (B, 3, H, W) float, any H, W) -> logits (B, num_classes, H, W).
    ``feature_layers``: block indices whose patch tokens feed the head (default: the last block only).
    """

    def __init__(self, num_classes: int, *, head: str = "largefov", feature_layers: Optional[Sequence[int]] = None,
                 img_size: int = 448, drop_path: float = 0.1, attention_backend: str = "auto",
                 head_channels: int = 512, dilation: int = 5, dropout: float = 0.5,
                 aspp_rates: Sequence[int] = (6, 12, 18, 24), **arch: Any) -> None:
        super().__init__()
        self.backbone = WSSSViT(1, mct=False, img_size=img_size, drop_path=drop_path,
                                attention_backend=attention_backend, **arch)
        self.backbone.head = nn.Identity()  # the classification head is not used; its keys are dropped on load
        depth = self.backbone.depth
        layers = (depth - 1,) if feature_layers is None else tuple(int(i) for i in feature_layers)
        if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < depth for i in layers):
            raise ValueError(f"feature_layers must be distinct block indices in [0, {depth}), got {feature_layers!r}")
        self.feature_layers = tuple(sorted(layers))
        d = self.backbone.embed_dim
        # the last block uses the backbone's final norm (loaded from DeiT/ViT checkpoints); others get their own
        self.feature_norms = nn.ModuleDict({str(i): nn.LayerNorm(d, eps=1e-6)
                                            for i in self.feature_layers if i != depth - 1})
        in_ch = d * len(self.feature_layers)
        if head == "largefov":
            self.head = LargeFOV(in_ch, num_classes, channels=head_channels, dilation=dilation, dropout=dropout)
        elif head == "aspp":
            self.head = ASPPv2(in_ch, num_classes, rates=aspp_rates)
        else:
            raise ValueError(f"head must be 'largefov' or 'aspp', got {head!r}")
        self.num_classes = int(num_classes)

    def features(self, images: Tensor) -> Tensor:
        """Padded images (B, 3, H', W'), H', W' multiples of the patch size -> (B, D * len(layers), h, w)."""
        bb = self.backbone
        x, grid = bb.embed(images)
        c = bb.num_prefix_tokens
        last = bb.depth - 1
        maps = []
        for i, blk in enumerate(bb.blocks):
            x = blk(x, c, False)[0]
            if i in self.feature_layers:
                norm = bb.norm if i == last else self.feature_norms[str(i)]
                tok = norm(x[:, c:])
                maps.append(tok.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1]))
            if i == self.feature_layers[-1]:
                break  # later blocks do not feed the head
        return torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]

    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        h, w = images.shape[-2:]
        p = self.backbone.patch_size
        ph, pw = math.ceil(h / p) * p, math.ceil(w / p) * p
        x = F.pad(images, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else images
        logits = self.head(self.features(x))
        logits = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


# ---------------------------------------------------------------------------------------------------- ResNet
class DeepLabResNet(nn.Module):
    """Dilated ResNet (output stride 8, torchvision ``replace_stride_with_dilation=[False, True, True]``) +
    DeepLabV2 ASPP or torchvision's DeepLabV3 ``DeepLabHead``. (B, 3, H, W) -> (B, num_classes, H, W)."""

    def __init__(self, num_classes: int, *, head: str = "aspp_v2", layers: Sequence[int] = (3, 4, 23, 3)) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        net = ResNet(Bottleneck, list(layers), replace_stride_with_dilation=[False, True, True])
        self.backbone = nn.Sequential()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.backbone.add_module(name, getattr(net, name))
        out_ch = net.layer4[-1].conv3.out_channels
        if head == "aspp_v2":
            self.head = ASPPv2(out_ch, num_classes)
        elif head == "deeplabv3":
            self.head = DeepLabHead(out_ch, num_classes)  # ASPP rates 12/24/36 + image pooling (torchvision)
        else:
            raise ValueError(f"head must be 'aspp_v2' or 'deeplabv3', got {head!r}")
        self.num_classes = int(num_classes)

    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------- loading
_SEG_FILE_PATTERN = re.compile(r"coco|voc|deeplab|fcn|lraspp|segment", re.IGNORECASE)
_SEG_KEY_PREFIXES = ("classifier.", "aux_classifier.", "head.", "aspp", "decoder.", "segmentation_head.")


def refuse_segmentation_weights(path: PathLike, state: Dict[str, Tensor]) -> None:
    """Raise ValueError if ``path`` looks like weights trained for segmentation (label leakage in WSSS).

    Detected by the file name (torchvision's ``deeplabv3_resnet101_coco-586e9e4e.pth``, deeplab-pytorch's
    ``deeplabv1_resnet101-coco.pth``, anything naming coco/voc/deeplab/fcn/lraspp/segment) and by the keys: a
    torchvision segmentation model stores ``backbone.*`` + ``classifier.*`` / ``aux_classifier.*``, and any
    stored segmentation head (``aspp*``, ``decoder.*``, ``head.*`` with a spatial kernel) is refused too.
    """
    name = os.path.basename(os.fspath(path))
    why = None
    if _SEG_FILE_PATTERN.search(name):
        why = f"its file name {name!r} names a segmentation dataset or model"
    else:
        seg_keys = [k for k in state if k.startswith(_SEG_KEY_PREFIXES)
                    and not (k.startswith("head.") and state[k].dim() < 4)]
        if seg_keys:
            why = f"it holds segmentation-head keys such as {seg_keys[0]!r}"
    if why is not None:
        raise ValueError(
            f"refusing {os.fspath(path)!r} as a ResNet-101 init: {why}. torchvision's COCO_WITH_VOC_LABELS weights "
            f"(and other segmentation checkpoints) were trained on masks of the VOC classes, which leaks labels in "
            f"weakly supervised segmentation; pass an ImageNet classification checkpoint (e.g. resnet101-63fe2227.pth)")


def _load_resnet_backbone(model: DeepLabResNet, path: PathLike) -> Dict[str, Any]:
    state = read_state_dict(path)
    refuse_segmentation_weights(path, state)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.backbone.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{os.fspath(path)!r}: {k} has shape {tuple(v.shape)} but the ResNet-101 backbone "
                             f"expects {tuple(own[k].shape)} (not a ResNet-101?)")
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or missing:
        raise ValueError(f"{os.fspath(path)!r} is not an ImageNet ResNet-101 checkpoint in torchvision/timm keys: "
                         f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]})")
    model.backbone.load_state_dict(state)
    return {"path": os.fspath(path), "missing_keys": [], "unexpected_keys": []}


def _read_vit_state(path: PathLike) -> Dict[str, Tensor]:
    """A DeiT/ViT file (plain state dict or under "model"/"state_dict") or a stage-one checkpoint of this
    project (``{"format": 1, "model": ...}`` with RNG state, which needs ``weights_only=False``)."""
    try:
        return read_state_dict(path)
    except ValueError as not_plain:
        try:
            ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=False)  # our own training checkpoint
        except Exception:  # not a pickle at all: report read_state_dict's message
            raise not_plain from None
        if not (isinstance(ckpt, dict) and ckpt.get("format") == 1 and isinstance(ckpt.get("model"), dict)):
            raise not_plain from None
        return {(k[7:] if k.startswith("module.") else k): v for k, v in ckpt["model"].items()}


def _load_vit_backbone(model: ViTSegmenter, path: PathLike) -> Dict[str, Any]:
    """Load a DeiT/ViT or stage-one (MCT: C class tokens, averaged into one) checkpoint into the backbone."""
    bb = model.backbone
    state = {k: v for k, v in _read_vit_state(path).items() if not k.startswith("head.")}
    if "seg_model" in state or any(k.startswith(("backbone.", "head.conv", "head.branches")) for k in state):
        raise ValueError(f"{os.fspath(path)!r} is a segmentation checkpoint; load it with load_seg_model")
    tok = state.get("cls_token")
    if tok is not None and tok.dim() == 3 and tok.shape[1] > 1:  # MCTformer stage one: C class tokens
        n = tok.shape[1]
        state["cls_token"] = tok.mean(dim=1, keepdim=True)
        if "pos_embed" in state:
            pos = state["pos_embed"]
            state["pos_embed"] = torch.cat([pos[:, :n].mean(dim=1, keepdim=True), pos[:, n:]], dim=1)
    state, _, adapted = adapt_state_dict(bb, state, os.fspath(path))
    own = bb.state_dict()
    if not any(k in own for k in state):
        raise ValueError(f"{os.fspath(path)!r} shares no parameter name with the ViT: not a timm ViT/DeiT checkpoint")
    res = bb.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith("head.")]
    if missing:
        raise ValueError(f"{os.fspath(path)!r} lacks ViT parameters {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''} (wrong architecture?)")
    return {"path": os.fspath(path), "unexpected_keys": list(res.unexpected_keys), "adapted_keys": adapted}


# ---------------------------------------------------------------------------------------------------- build
def build_seg_model(name: str, num_classes: int, *, pretrained: Optional[PathLike] = None,
                    **kwargs: Any) -> nn.Module:
    """Build segmentation model ``name`` (one of ``SEG_MODELS``) for ``num_classes`` classes (background
    included: 21 for VOC). The model maps (B, 3, H, W) float images of any size to (B, num_classes, H, W) logits.

    pretrained: local backbone weights (nothing is downloaded). ViT models: a timm DeiT/ViT file or a
        stage-one checkpoint of this project (MCT class tokens are averaged into the one cls token; position
        grid resized). ResNet models: an ImageNet ResNet-101 classifier; segmentation weights are refused.
    kwargs, ViT: feature_layers (block indices, default last), img_size (448: stored position grid),
        drop_path (0.1), attention_backend, head_channels (512), dilation (5), dropout (0.5), aspp_rates,
        and tiny-test overrides embed_dim, depth, num_heads, mlp_ratio, patch_size.
        ResNet: the tiny-test override layers (Bottleneck blocks per stage, default (3, 4, 23, 3)).
    The model gets ``seg_config`` = {"name", "num_classes", **kwargs} (what :func:`save_seg_checkpoint` stores)
    and ``pretrained_report`` (what was loaded, or None).
    """
    if name not in SEG_MODELS:
        raise ValueError(f"unknown segmentation model {name!r}; choose one of {SEG_MODELS}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    if name in _VIT:
        vit_name, head = _VIT[name]
        allowed = {"feature_layers", "img_size", "drop_path", "attention_backend", "head_channels", "dilation",
                   "dropout", "aspp_rates", *_VIT_OVERRIDES}
        _check_kwargs(name, kwargs, allowed)
        arch = {**MODEL_CONFIGS[vit_name][1], **{k: v for k, v in kwargs.items() if k in _VIT_OVERRIDES}}
        rest = {k: v for k, v in kwargs.items() if k not in _VIT_OVERRIDES}
        model: nn.Module = ViTSegmenter(num_classes, head=head, **rest, **arch)
        loader = _load_vit_backbone
    else:
        _check_kwargs(name, kwargs, set(_RESNET_OVERRIDES))
        model = DeepLabResNet(num_classes, head=_RESNET[name], **kwargs)
        loader = _load_resnet_backbone
    model.seg_config = {"name": name, "num_classes": num_classes, **kwargs}
    model.pretrained_report = loader(model, pretrained) if pretrained is not None else None
    return model


def _check_kwargs(name: str, kwargs: Dict[str, Any], allowed) -> None:
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(f"build_seg_model({name!r}) got unknown keyword arguments {bad}; allowed: {sorted(allowed)}")


def save_seg_checkpoint(path: PathLike, model: nn.Module, **extra: Any) -> None:
    """Write ``{"model": state_dict, "seg_model": model.seg_config, **extra}`` atomically (tmp + os.replace).
    ``model`` must come from :func:`build_seg_model` (it carries ``seg_config``)."""
    config = getattr(model, "seg_config", None)
    if config is None:
        raise ValueError("model has no seg_config: build it with build_seg_model so the checkpoint can rebuild it")
    bad = sorted({"model", "seg_model"} & set(extra))
    if bad:
        raise ValueError(f"extra checkpoint entries may not be named {bad}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"model": model.state_dict(), "seg_model": dict(config), **extra}, tmp)
    os.replace(tmp, path)


def load_seg_model(path: PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild and load a model from a checkpoint with "model" and "seg_model" (see the module docstring);
    returned in eval mode. FileNotFoundError / ValueError name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmentation checkpoint not found: {path!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)  # may hold the trainer's RNG state
    except Exception as err:  # any unpickling failure: not a checkpoint; re-raised with the file name
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("seg_model"), dict) or \
            not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path!r} is not a segmentation checkpoint: expected a dict with 'model' (state dict) "
                         f"and 'seg_model' ({{'name', 'num_classes', ...}})")
    config = dict(ckpt["seg_model"])
    if "name" not in config or "num_classes" not in config:
        raise ValueError(f"{path!r}: 'seg_model' must hold 'name' and 'num_classes', got {sorted(config)}")
    model = build_seg_model(config.pop("name"), config.pop("num_classes"), **config)
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in ckpt["model"].items()}
    state = {(k[10:] if k.startswith("_orig_mod.") else k): v for k, v in state.items()}  # torch.compile
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path!r}: state dict does not fit {model.seg_config['name']}: {err}") from err
    return model.eval()
