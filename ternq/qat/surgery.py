"""Module surgery that quantizing, dequantizing and packing share: one definition each, so the three agree.

A QAT layer, the float layer `dequantize` returns and a packed layer are all shallow clones of the user's layer
(its parameters, submodules and hooks, in dicts of their own); the legacy ``torch.nn.utils.weight_norm`` /
``spectral_norm`` keep the weight in extra tensors (``weight_g`` / ``weight_v``, ``weight_orig`` / ``weight_u``)
and a pre-hook that recomputes it, which a clone without a float weight must drop.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm

__all__ = ["LEGACY_SUFFIXES", "legacy_weight_hook", "drop_legacy_weight", "shallow_clone"]

#: the tensors the legacy reparametrizations keep for weight ``w``: ``w_g``, ``w_v`` (weight_norm) and
#: ``w_orig``, ``w_u``, ``w_v`` (spectral_norm)
LEGACY_SUFFIXES = ("_g", "_v", "_orig", "_u")


def legacy_weight_hook(module: nn.Module, name: str) -> Any:
    """The legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` pre-hook computing `name`, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (_WeightNorm, _SpectralNorm)) and hook.name == name:
            return hook
    return None


def drop_legacy_weight(clone: nn.Module, source: nn.Module, name: str) -> None:
    """Remove from `clone` (a `shallow_clone` of `source`) the legacy hook computing `name` and the tensors it
    computes it from, with the state-dict hooks that would write them."""
    hook = legacy_weight_hook(source, name)
    if hook is None:
        return
    for hook_id, h in list(clone._forward_pre_hooks.items()):
        if h is hook:
            del clone._forward_pre_hooks[hook_id]
    for suffix in LEGACY_SUFFIXES:
        clone._parameters.pop(name + suffix, None)
        clone._buffers.pop(name + suffix, None)
    clone._state_dict_hooks.clear()
    clone._load_state_dict_pre_hooks.clear()


def shallow_clone(module: nn.Module, cls: type) -> nn.Module:
    """A new object of `cls` sharing `module`'s parameters and submodules, with its own registries and hooks
    dicts, so that changing the clone never changes `module` (conversion can be rolled back by keeping it).

    The dicts are copies of their own type: hook dicts are OrderedDicts, which ``register_forward_hook``'s
    ``RemovableHandle`` references weakly (a plain dict copy broke every hook registration)."""
    clone = cls.__new__(cls)
    clone.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return clone
