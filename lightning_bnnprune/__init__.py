"""lightning-bnnprune: structured filter pruning for binary neural networks, as Lightning callbacks."""
from . import models  # registers the CIFAR networks in timm's registry
from . import quantizers
from .binarize import binarize_model
from .callbacks import Binarize
from .layers import BinaryConv2d

__version__ = "0.1.0"

__all__ = ["Binarize", "BinaryConv2d", "binarize_model", "quantizers", "__version__"]
