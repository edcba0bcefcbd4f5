"""Lightning callbacks: the library's user-facing entry points."""
from .binarize import Binarize

__all__ = ["Binarize"]
