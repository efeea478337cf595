"""timm-compatible ViT backbones (MCTformer-V2 and single-class-token ViT/DeiT) with attention export."""
from aream_fast.models.factory import MODEL_CONFIGS, build_model
from aream_fast.models.pretrained import LoadReport, load_pretrained
from aream_fast.models.vit import WSSSViT

__all__ = ["MODEL_CONFIGS", "LoadReport", "WSSSViT", "build_model", "load_pretrained"]
