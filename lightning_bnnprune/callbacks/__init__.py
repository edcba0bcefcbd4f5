"""Lightning callbacks: the library's user-facing entry points."""
from .base import FilterPruning
from .bdg import ZeroFilterPruning
from .binarize import Binarize
from .greedy import GreedyFilterPruning
from .msf import MainSubsidiaryPruning
from .random_state import RandomStateCheckpoint

__all__ = [
    "Binarize", "FilterPruning", "GreedyFilterPruning", "MainSubsidiaryPruning", "RandomStateCheckpoint",
    "ZeroFilterPruning",
]
