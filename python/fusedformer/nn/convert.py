"""In-place conversion of torch.nn modules to their fusedformer twins.

Every fusedformer module here subclasses its torch.nn namesake and adds no parameter or buffer, so
a torch.nn instance becomes its twin by changing its class: the parameters stay the same objects
(an optimizer holding them keeps working), and the state_dict keys are unchanged. Only modules of
exactly the torch.nn type are converted; subclasses (which may override ``forward``) are left alone.

Each twin registers itself here with :func:`twin_of` where it is defined, so this module imports
none of them: the layers that convert their own submodules (a TransformerEncoderLayer built with a
torch.nn LayerNorm inside) call :func:`fuse_children_` without an import cycle. Importing any of
fusedformer.nn imports the package, and with it every twin, before the table is read.
"""

from typing import Callable, Dict

import torch

# torch.nn type -> fusedformer twin
_TWINS: Dict[type, type] = {}


def twin_of(torch_cls: type) -> Callable[[type], type]:
    """Class decorator: the decorated class is the twin that ``torch_cls`` instances convert to."""

    def register(cls: type) -> type:
        _TWINS[torch_cls] = cls
        return cls

    return register


def twins() -> Dict[type, type]:
    """torch.nn type -> fusedformer twin."""
    return dict(_TWINS)


def fuse_children_(root: torch.nn.Module) -> None:
    """Convert every torch.nn module under ``root`` (and ``root`` itself) to its twin in place."""
    for m in root.modules():
        twin = _TWINS.get(type(m))
        if twin is not None:
            m.__class__ = twin
