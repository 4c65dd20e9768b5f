"""In-place conversion of torch.nn modules to their fusedformer twins.

Every fusedformer module here subclasses its torch.nn namesake and adds no parameter or buffer, so
a torch.nn instance becomes its twin by changing its class: the parameters stay the same objects
(an optimizer holding them keeps working), and the state_dict keys are unchanged. Only modules of
exactly the torch.nn type are converted; subclasses (which may override ``forward``) are left alone.
"""

from typing import Dict, List, Optional, Tuple

import torch


def twins() -> Dict[type, type]:
    """torch.nn type -> fusedformer twin."""
    from .attention import MultiheadAttention
    from .layers import TransformerDecoderLayer, TransformerEncoderLayer
    from .norm import LayerNorm, RMSNorm
    from .transformer import Transformer, TransformerDecoder, TransformerEncoder

    return {
        torch.nn.LayerNorm: LayerNorm,
        torch.nn.RMSNorm: RMSNorm,
        torch.nn.MultiheadAttention: MultiheadAttention,
        torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
        torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
        torch.nn.TransformerEncoder: TransformerEncoder,
        torch.nn.TransformerDecoder: TransformerDecoder,
        torch.nn.Transformer: Transformer,
    }


def fuse_module_(module: torch.nn.Module, table: Optional[Dict[type, type]] = None) -> Optional[Tuple[type, type]]:
    """Turn ``module`` into its twin in place; returns (old type, new type), or None if it has none."""
    twin = (table if table is not None else twins()).get(type(module))
    if twin is None:
        return None
    old = type(module)
    module.__class__ = twin
    return old, twin


def fuse_children_(root: torch.nn.Module) -> List[Tuple[str, type, type]]:
    """Convert every torch.nn module under ``root`` (and ``root`` itself); returns what changed."""
    table = twins()
    changed = []
    for name, m in root.named_modules():
        r = fuse_module_(m, table)
        if r is not None:
            changed.append((name, *r))
    return changed
