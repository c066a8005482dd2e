"""`report`: one row per candidate weight, saying what `quantize` decided and why, plus size totals.

A converted model carries everything the report needs: the `ternq.find.sites.Site` record `quantize` (or
`load_packed`, from the file's manifest) left on it, one per candidate weight: its config or float, the rule
that chose it, how it was found and the reason. On a float model, `report` is a dry run of `quantize` with the
same arguments.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import Tensor, nn

from ._text import aligned_table, human_bytes
from .config import QuantConfig
from .convert import plan, quantized_parts, site_record
from .errors import AlreadyQuantizedError
from .find.graph import describe_type
from .find.sites import Kind, Site, sites_of
from .find.sites import join as _join
from .qat.layers import is_quantized, layer_spec
from .qat.weight_attr import latent_parameter
from .runtime import is_packed

__all__ = ["Report", "ReportRow", "report"]

_SCALE_BYTES = 4  # scales are stored as float32


@dataclass(frozen=True)
class ReportRow:
    """One candidate weight.

    Attributes:
        name: the weight's state_dict key (``encoder.layers.0.self_attn.in_proj_weight``; a layer's ``weight``
            even when weight_norm stores it as ``weight_g`` / ``weight_v``).
        type: layer type, e.g. "Conv1d[weight_norm]", "F.linear", or for a weight-only site the module holding
            it and the ops reading it, "LSTM[lstm]".
        params: parameters the layer holds (weight_norm's g and v and the bias included); the weight alone for
            functional calls and weight-only sites.
        decision: "ternary", "int<k>", or "float" when kept in float.
        rule: the rule that decided, e.g. 'include[0] "decoder.*"', 'exclude[0] output_layers()', "default".
        path: how ternq found the weight: "fx" (traced code calls it), "swap" (module walk only), "fx-lenient",
            "native" (a torch.nn module's kernel reads it), "recorded" (seen running example inputs), "-".
        reason: what else is true of it: "weights only: ..." (the op takes no quantized input), "no input norm:
            ..." (one input feature), or why a float weight stayed float ("use not found: ...").
        layer: the name selectors match: the layer's module name, or the weight's path for the other kinds.
        bytes_before: the weight's storage in the state_dict now (bias excluded: it stays float).
        bytes_after: estimated packed weight + scales (equal to bytes_before when kept float).
    """

    name: str
    type: str
    params: int
    decision: str
    rule: str
    path: str
    reason: str
    layer: str
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class Report:
    """The conversion report; ``print(report)`` shows an aligned table with totals.

    Attributes:
        rows: one per candidate layer, in module order.
        bytes_before: size of the model's state_dict as it is (tensors shared by several keys counted once).
        bytes_after: estimated size with quantized weights packed (ternary: 5 weights per byte, k-bit:
            ``config.bits_per_weight``, plus float32 scales); everything else at its dtype's size.
        applied: True for a converted model, False for a dry run on a float model.
    """

    rows: list[ReportRow]
    bytes_before: int
    bytes_after: int
    applied: bool

    @property
    def counts(self) -> dict[str, int]:
        """Number of layers per decision, e.g. ``{"ternary": 10, "float": 1}``."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.decision] = out.get(row.decision, 0) + 1
        return out

    @property
    def params_quantized(self) -> int:
        return sum(r.params for r in self.rows if r.decision != "float")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"applied": self.applied, "rows": [asdict(r) for r in self.rows],
                "totals": {"weights": len(self.rows), "counts": self.counts,
                           "params": sum(r.params for r in self.rows), "params_quantized": self.params_quantized,
                           "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}}

    def __str__(self) -> str:
        header = ("weight", "type", "params", "decision", "rule", "path", "reason")
        body = [(r.name, r.type, f"{r.params:,}", r.decision, r.rule, r.path, r.reason) for r in self.rows]
        counts = ", ".join(f"{n} {d}" for d, n in sorted(self.counts.items(), key=lambda kv: kv[0] == "float"))
        total = sum(r.params for r in self.rows)
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
        title = "ternq conversion report" if self.applied else "ternq conversion plan (dry run, not applied)"
        return "\n".join([
            title, *aligned_table(header, body, right={2}),
            f"{len(self.rows)} weights: {counts or 'none'}; {self.params_quantized:,} of {total:,} layer parameters "
            "quantized",
            f"state_dict {human_bytes(self.bytes_before)} -> ~{human_bytes(self.bytes_after)} packed "
            f"({ratio:.2f}x smaller)",
        ])


def _wrapped_layer(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """The ternq layer of a site, where another library has wrapped it since (peft's LoRA layer holds the
    quantized layer as ``base_layer``): (its name, it). A float layer (a dry run's) is its own."""
    if is_quantized(module) or is_packed(module):
        return name, module
    for sub, inner in module.named_modules():
        if is_quantized(inner) or is_packed(inner):
            return _join(name, sub), inner
    return name, module


def _weight_keys(prefix: str, module: nn.Module) -> list[str]:
    """state_dict keys of a layer that hold its weight (plain, weight_norm g/v, parametrization originals)."""
    spec = layer_spec(module) or getattr(module, "spec", None)
    w = spec.weight_name if spec is not None else "weight"
    keys = [k for k in module.state_dict(keep_vars=True)
            if k == w or k.startswith(f"{w}_") or k.startswith(f"parametrizations.{w}.")]
    return [f"{prefix}.{k}" if prefix else k for k in keys]


def _packed_bytes(shape: tuple[int, ...], config: QuantConfig, out_dim: int) -> int:
    numel = math.prod(shape)
    n_scales = math.prod(config.scale_shape(shape, out_dim))
    return math.ceil(numel * config.bits_per_weight / 8) + n_scales * _SCALE_BYTES


def _storage_key(key: str, t: Tensor) -> tuple[Any, ...]:
    try:
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    except RuntimeError:  # a wrapper without storage of its own (a packed layer's `PackedWeight`)
        ptr = 0
    return (ptr, t.storage_offset(), tuple(t.shape), t.dtype) if ptr else ("key", key)


@dataclass
class _Entry:
    """A row before its byte sizes are known (they need every entry: tensors may be shared)."""

    row: ReportRow  # bytes_before / bytes_after still 0
    weight_keys: list[str]
    packed: int


def _entries(model: nn.Module, sites: list[tuple[str, Site]]) -> list[_Entry]:
    entries = []
    for prefix, site in sites:
        layer, key = _join(prefix, site.name), _join(prefix, site.key)
        if site.kind == Kind.LAYER:
            module = model.get_submodule(layer)
            if site.config is not None:
                layer, module = _wrapped_layer(layer, module)
                key = _join(layer, (layer_spec(module) or module.spec).weight_name)
            spec = layer_spec(module) or module.spec  # a packed layer (`ternq.runtime`) keeps its spec
            weight = module.float_weight() if is_quantized(module) else getattr(module, spec.weight_name)
            keys = _weight_keys(layer, module)
        else:
            weight, keys = latent_parameter(model, key), [key]
        packed = 0 if site.config is None else _packed_bytes(tuple(weight.shape), site.config, site.out_dim)
        row = ReportRow(key, site.type, site.params, site.decision, site.rule, site.path, site.reason, layer, 0, 0)
        entries.append(_Entry(row, keys, packed))
    return entries


def _sizes(model: nn.Module, entries: list[_Entry]) -> tuple[int, int, dict[str, int]]:
    """(state_dict bytes, estimated packed bytes, bytes per state_dict key) with shared tensors counted once:
    a weight tied between two quantized layers is packed once."""
    quantized = {k for e in entries if e.row.decision != "float" for k in e.weight_keys}
    groups: dict[tuple[Any, ...], list[Any]] = {}
    per_key: dict[str, int] = {}
    group_of: dict[str, tuple[Any, ...]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor):
            continue
        size = t.numel() * t.element_size()
        per_key[key] = size
        group_of[key] = _storage_key(key, t)
        group = groups.setdefault(group_of[key], [size, True])
        group[1] = group[1] and key in quantized
    before = sum(g[0] for g in groups.values())
    packed: dict[Any, int] = {}
    for e in entries:
        if e.row.decision != "float":
            packed.setdefault(group_of.get(e.weight_keys[0], e.row.name) if e.weight_keys else e.row.name, e.packed)
    after = sum(g[0] for g in groups.values() if not g[1]) + sum(packed.values())
    return before, after, per_key


def _live_sites(model: nn.Module) -> list[tuple[str, Site]]:
    """Sites of a model holding QAT layers without a `quantize` record (layers converted one by one)."""
    sites = []
    for name, module in model.named_modules():
        if is_quantized(module):
            spec = layer_spec(module)
            sites.append(("", Site(name, _join(name, spec.weight_name), Kind.LAYER, describe_type(module),
                                   sum(p.numel() for p in module.parameters()), module.qconfig,
                                   "-", "-", "no quantize() record: converted layer by layer",
                                   out_dim=spec.weight_out_dim)))
    return sites


def report(model: nn.Module, include: Any = None, exclude: Any = None, config: QuantConfig | None = None, *,
           example_inputs: Any = None) -> Report:
    """The conversion report of `model`: one row per candidate weight, with totals.

    On a model converted by `ternq.quantize` (or holding converted submodules), call it with the model alone:
    the rows come from the record `quantize` left. On a float model it is a dry run: the arguments are those
    of `ternq.quantize`, nothing is changed, and ``applied`` is False.

    Example:
        ```python
        print(ternq.report(model))        # aligned table, totals
        ternq.report(model).to_dict()     # the same as JSON-ready data
        ```
    """
    if quantized_parts(model):
        if include is not None or exclude is not None or config is not None or example_inputs is not None:
            raise AlreadyQuantizedError("report(model, include/exclude/config/example_inputs) previews the "
                                        "conversion of a float model; this model is already converted: call "
                                        "report(model)")
        sites, applied = sites_of(model) or _live_sites(model), True
    else:
        analysis, decisions = plan(model, include, exclude, config, example_inputs)
        sites, applied = [("", site_record(c, decisions[c.name])) for c in analysis.candidates], False
    entries = _entries(model, sites)
    before, after, per_key = _sizes(model, entries)
    rows = []
    for e in entries:
        weight_bytes = sum(per_key.get(k, 0) for k in e.weight_keys)
        rows.append(replace(e.row, bytes_before=weight_bytes,
                            bytes_after=e.packed if e.row.decision != "float" else weight_bytes))
    return Report(rows, before, after, applied)
