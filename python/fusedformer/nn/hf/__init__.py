"""Fused twins of HuggingFace transformers modules (BERT, GPT-2, Llama), used by fusedformer.patch.

Like the torch.nn twins, each subclasses the transformers class it replaces and adds no parameter,
so a module is converted by changing its class: same weights, same state_dict keys, and
transformers' output capturing (which matches module classes) keeps working. This package imports
transformers; fusedformer.patch imports it only when a model holds transformers modules.

The twins rely on the structure of transformers 5 (attention modules whose forward receives the
model's prepared mask, the attribute names of each module). Before converting anything, the
version and, for every module to convert, its attributes and forward parameters are checked; on a
mismatch nothing is converted and a RuntimeError says what differs.
"""

import importlib
import inspect
from typing import Dict, Optional

import torch

SUPPORTED_MAJOR = 5
TESTED_VERSION = "5.23 and 5.24"

# transformers module of a class -> the twin module here
FAMILIES = {
    "transformers.models.bert.modeling_bert": ".bert",
    "transformers.models.gpt2.modeling_gpt2": ".gpt2",
    "transformers.models.llama.modeling_llama": ".llama",
}


def installed_version() -> str:
    import transformers

    return transformers.__version__


def check_version() -> str:
    version = installed_version()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major != SUPPORTED_MAJOR:
        raise RuntimeError(
            f"fusedformer.patch: transformers {version} is not supported (supported: {SUPPORTED_MAJOR}.x, tested "
            f"with {TESTED_VERSION}); its modules are built differently. The model was left unchanged; install "
            f"transformers {SUPPORTED_MAJOR}.x or use fusedformer.nn modules directly."
        )
    return version


def _check_structure(module: torch.nn.Module, cls: type, requires, version: str) -> None:
    from .common import CACHE_NAMES

    attrs, params = requires
    missing = [a for a in attrs if not hasattr(module, a)]
    # the KV-cache parameter counts as one name whichever of its names the version uses ("cache")
    got = tuple(CACHE_NAMES[0] if p in CACHE_NAMES else p for p in inspect.signature(cls.forward).parameters)
    if missing or got != params:
        what = []
        if missing:
            what.append(f"it has no attribute(s) {', '.join(missing)}")
        if got != params:
            what.append(f"its forward takes ({', '.join(got)}), expected ({', '.join(params)})")
        raise RuntimeError(
            f"fusedformer.patch: {cls.__module__}.{cls.__qualname__} of transformers {version} is not the structure "
            f"fusedformer knows ({'; '.join(what)}); tested with transformers {TESTED_VERSION}. The model was left "
            "unchanged."
        )


def twin_for(module: torch.nn.Module, cache: Dict[str, object]) -> Optional[type]:
    """The fused twin class of a transformers module, or None if there is none. Raises RuntimeError
    for a transformers version or module structure that the twins do not know."""
    cls = type(module)
    family = FAMILIES.get(cls.__module__)
    if family is None:
        return None
    if "version" not in cache:
        cache["version"] = check_version()
    fam = importlib.import_module(family, __name__)
    twin = fam.TWINS.get(cls)
    if twin is None:
        return None
    _check_structure(module, cls, fam.REQUIRES[cls], cache["version"])
    return twin
