"""`Site`: what `quantize` decided for one candidate weight, the one record `report` and `pack` read.

`quantize` stores the list on the module it converted (``model._ternq_sites``, a plain attribute: no state_dict
entry); the live modules hold only what they need to compute (a QAT layer its config, a `WeightQuant` its
parameter's name and config).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from ..config import QuantConfig

__all__ = ["Kind", "Site", "SITES", "sites_of", "join", "relative"]

#: plain attribute of a converted module: its list of `Site`
SITES = "_ternq_sites"


class Kind(StrEnum):
    """What holds a quantized weight; every stage (find, quantize, pack, load, report) dispatches on it.

    A `StrEnum`, so it prints and compares as its value ("layer" == Kind.LAYER) and the file format, which
    stores a record's ``type`` and not its kind, is unchanged.
    """

    LAYER = "layer"  #: a module of a registered layer type: QAT layer, inputs quantized too
    FUNCTIONAL = "functional"  #: a parameter a forward passes to ``F.linear`` / ``F.conv1d`` / ...: call quantized
    WEIGHT = "weight"  #: a parameter read some other way: only the weight is quantized
    UNKNOWN = "unknown"  #: a parameter whose use ternq could not see (kept float unless asked)

    @classmethod
    def of_type(cls, type_name: str) -> Kind:
        """The kind of a packed file's record from its ``type``: "weight", "F.<op>" or a layer class's name."""
        if type_name == "weight":
            return cls.WEIGHT
        return cls.FUNCTIONAL if type_name.startswith("F.") else cls.LAYER


@dataclass(frozen=True)
class Site:
    """One candidate weight and what was done to it.

    Attributes:
        name: what selectors matched (a layer's module name, or the weight's path for the other kinds).
        key: the weight's state_dict key, relative to the converted module.
        kind: what holds the weight (`Kind`).
        type: the layer type the report shows.
        params: parameters the layer holds (the weight alone for the other kinds).
        config: the config applied (after kind-specific changes), None when kept float.
        rule: the rule that decided.
        path: how ternq found it ("fx", "swap", "fx-lenient", "native", "recorded", "-").
        reason: anything else a reader must know: "weights only: ...", "no input norm: ...", why it stayed float.
        out_dim: the weight dimension of output channels (the scales' axis for per-channel configs).
    """

    name: str
    key: str
    kind: Kind
    type: str
    params: int
    config: QuantConfig | None
    rule: str
    path: str
    reason: str = ""
    out_dim: int = 0

    @property
    def decision(self) -> str:
        """"ternary", "int<k>", or "float"."""
        return "float" if self.config is None else self.config.name


def join(prefix: str, name: str) -> str:
    """The qualified name of `name` inside module `prefix` ("" is the model itself)."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def relative(key: str, scope: str) -> str:
    """`key` (a qualified name under module `scope`) as seen from `scope`: the inverse of `join`."""
    return key[len(scope) + 1:] if scope else key


def sites_of(model: nn.Module) -> list[tuple[str, Site]]:
    """(module prefix, site) for every site recorded in `model` (a converted model, or one holding converted
    submodules)."""
    found = []
    for prefix, module in model.named_modules():
        for site in module.__dict__.get(SITES, ()):
            found.append((prefix, site))
    return found
