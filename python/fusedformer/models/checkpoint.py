"""Checkpoints: ``model.safetensors`` (the state dict) and ``config.json`` in a folder, plus the
tokenizer's ``tokenizer.json`` when one is given. Loading checks every name and shape and reports a
missing, mismatched or truncated file with its path."""

import json
import os

import torch

from ..nn.masked import masked_layers, plain_state_dict, restore_masks
from ..nn.quantized import QuantizedLinear

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


class CheckpointMixin:
    """``save_pretrained(dir)`` / ``cls.from_pretrained(dir)`` for a module with a ``config`` (a dataclass of
    models.config) and a ``config_class``. Tied weights are stored once."""

    config_class = None

    def _init_config(self, config, kwargs):
        """Set and return ``self.config``: ``config``, or a ``config_class(**kwargs)`` without one
        (``GPT(n_layer=2, ...)``)."""
        self.config = config if config is not None else self.config_class(**kwargs)
        return self.config

    def save_pretrained(self, directory, tokenizer=None, dtype=None):
        """Write the weights (cast to ``dtype`` when given, e.g. torch.bfloat16 to halve the file; floating
        tensors only, quantized layers' weights and scales never), the config and the tokenizer;
        ``from_pretrained`` casts back to the model's dtype. A quantized model (fusedformer.quantize)
        keeps its packed weights and scales as they are, and the config its ``"quantization"``: the
        scheme, the group size and the quantized layers. A pruned model's masked layers (fusedformer.prune)
        are stored as their masked weights, and the config lists them (``"pruning": {"masked": [...]}``),
        so that ``from_pretrained`` masks them again by their nonzeros."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        quantized = quantization_config(self)
        exact = {f"{m}.{b}" for m in (quantized or {}).get("modules", ()) for b in ("qweight", "scale")}
        state, seen = {}, {}
        for name, t in plain_state_dict(self).items():
            key = (t.data_ptr(), t.shape, t.stride())
            if key in seen:  # a tied weight: stored under its first name only
                continue
            seen[key] = name
            t = t.detach()
            cast = dtype is not None and t.is_floating_point() and name not in exact
            state[name] = (t.to(dtype) if cast else t).contiguous()
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        config = self.config.to_dict()
        if quantized:
            config["quantization"] = quantized
        masked = sorted(masked_layers(self))
        if masked:
            config["pruning"] = {"masked": masked}
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1)
        if tokenizer is not None:
            tokenizer.save(os.path.join(directory, TOKENIZER_NAME))

    @classmethod
    def from_pretrained(cls, directory, *, dtype=None, device="cpu"):
        cfg_path = os.path.join(directory, CONFIG_NAME)
        w_path = os.path.join(directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: {p} does not exist")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cls.__name__}.from_pretrained: {cfg_path} is not valid JSON ({e})") from None
        quantized = cfg.pop("quantization", None)
        pruning = cfg.pop("pruning", None)
        config = cls.config_class.from_dict(cfg)
        state = load_weights(w_path)
        model = cls(config)
        if quantized:
            make_quantized(model, quantized, cfg_path)
        load_state(model, state, w_path)
        if pruning:
            restore_masks(model, pruning.get("masked", ()), cfg_path)
        if dtype is not None:
            model.to(dtype)
        return model.to(device).eval()


def quantization_config(model):
    """The ``"quantization"`` entry of a quantized model's config (scheme, group_size, the quantized
    layers' names), or None for a float model."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return None
    schemes = {(m.scheme, m.group_size) for m in layers.values()}
    if len(schemes) > 1:
        raise ValueError(f"save_pretrained: the quantized layers mix schemes {sorted(schemes, key=str)}; "
                         "a checkpoint holds one")
    scheme, group_size = schemes.pop()
    return {"scheme": scheme, "group_size": group_size, "modules": sorted(layers)}


def make_quantized(model, quantized, source):
    """Replace the layers a checkpoint's ``"quantization"`` entry names by empty QuantizedLinear layers
    of its scheme, for the saved packed weights to load into."""
    modules = dict(model.named_modules())
    for name in quantized.get("modules", ()):
        m = modules.get(name)
        if not isinstance(m, torch.nn.Linear) or not name:
            raise ValueError(f"{source}: the quantized layer {name!r} is not a linear layer of the model")
        q = QuantizedLinear(m.in_features, m.out_features, quantized["scheme"], group_size=quantized.get("group_size"),
                            bias=m.bias is not None, dtype=m.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, q)


def load_weights(path):
    """The tensors of a safetensors file; a truncated or corrupt file raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"cannot read weights from {path}: the file is truncated or not a safetensors file "
                         f"({e})") from None


def load_state(model, state, source="state dict"):
    """Copy ``state`` into ``model``; every parameter must be there with its shape (a tied weight may be
    given under either name), and no extra tensor may be."""
    own = model.state_dict()
    groups = {}  # storage -> names sharing it (tied weights)
    for name, t in own.items():
        groups.setdefault((t.data_ptr(), t.shape), []).append(name)
    missing, mismatched = [], []
    used = set()
    for names in groups.values():
        given = [n for n in names if n in state]
        if not given:
            missing.append(names[0])
            continue
        src = state[given[0]]
        used.update(given)
        target = own[names[0]]
        if tuple(src.shape) != tuple(target.shape):
            mismatched.append(f"{given[0]}: expected {tuple(target.shape)}, got {tuple(src.shape)}")
            continue
        with torch.no_grad():
            target.copy_(src)
    unexpected = sorted(set(state) - used)
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if problems:
        raise ValueError(f"{type(model).__name__}: the weights in {source} do not fit the config: " +
                         "; ".join(problems))
