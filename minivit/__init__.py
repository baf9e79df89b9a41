"""minivit: a Vision Transformer with every forward and backward pass written by hand."""
from .config import MODEL_PRESETS, PRESETS, HybridConfig, ViTConfig, get_model_preset, get_preset
from .model import HybridViT, ViT, build_model
from .modules import Attention, Block, LayerNorm, Linear, Mlp, Module, Parameter, PatchEmbed

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ViTConfig", "get_preset", "ViT",
    "MODEL_PRESETS", "HybridConfig", "get_model_preset", "HybridViT", "build_model",
    "Attention", "Block", "LayerNorm", "Linear", "Mlp", "Module", "Parameter", "PatchEmbed",
]
