"""OpenMythos: a Recurrent-Depth Transformer (looped language model) in PyTorch."""

from .config import AttnType, MythosConfig
from .model import OpenMythos

__all__ = ["AttnType", "MythosConfig", "OpenMythos"]
