"""minivit: a Vision Transformer with every forward and backward pass written by hand."""
from .config import PRESETS, ViTConfig, get_preset
from .model import ViT
from .modules import Attention, Block, LayerNorm, Linear, Mlp, Module, Parameter, PatchEmbed

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ViTConfig", "get_preset", "ViT",
    "Attention", "Block", "LayerNorm", "Linear", "Mlp", "Module", "Parameter", "PatchEmbed",
]
