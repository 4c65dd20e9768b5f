"""Model pruning: ``prune`` (magnitude, N:M and structured), ``remove_masks`` and ``sparsity``."""

from ..nn.masked import remove_masks
from .prune import prune, sparsity

__all__ = ["prune", "remove_masks", "sparsity"]
