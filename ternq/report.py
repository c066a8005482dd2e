"""`report`: one row per candidate layer, saying what `quantize` decided and why, plus size totals.

A converted model carries everything the report needs: each QAT layer / functional quantizer records its config,
the rule that chose it (``ternq_rule``) and how it was reached (``ternq_path``: "fx" when traced code calls it,
"swap" when only the module walk found it); the layers kept in float are listed in a plain attribute of the
converted module. On a float model, `report` is a dry run of `quantize` with the same arguments.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import Tensor, nn

from ._text import aligned_table, human_bytes
from .config import QuantConfig
from .convert import KEPT_FLOAT, plan, quantized_parts
from .errors import AlreadyQuantizedError
from .functional import FunctionalQuant
from .graph import describe_type
from .layers import is_quantized, layer_spec

__all__ = ["Report", "ReportRow", "report"]

_SCALE_BYTES = 4  # scales are stored as float32


@dataclass(frozen=True)
class ReportRow:
    """One candidate layer.

    Attributes:
        name: qualified name (functional calls: owner name + "." + the weight's attribute path).
        type: layer type, e.g. "Conv1d[weight_norm]" or "F.linear".
        params: parameters the layer holds (weight_norm's g and v and the bias included).
        decision: "ternary", "int<k>", or "float" when kept in float.
        rule: the rule that decided, e.g. 'include[0] "decoder.*"', 'exclude[0] output_layers()', "default".
        path: "fx" (called from fx-traced code) or "swap" (found by walking the module tree only).
        bytes_before: the layer's weight storage in the state_dict now (bias excluded: it stays float).
        bytes_after: estimated packed weight + scales (equal to bytes_before when kept float).
    """

    name: str
    type: str
    params: int
    decision: str
    rule: str
    path: str
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
                "totals": {"layers": len(self.rows), "counts": self.counts,
                           "params": sum(r.params for r in self.rows), "params_quantized": self.params_quantized,
                           "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}}

    def __str__(self) -> str:
        header = ("name", "type", "params", "decision", "rule", "path")
        body = [(r.name or "(model)", r.type, f"{r.params:,}", r.decision, r.rule, r.path) for r in self.rows]
        counts = ", ".join(f"{n} {d}" for d, n in sorted(self.counts.items(), key=lambda kv: kv[0] == "float"))
        total = sum(r.params for r in self.rows)
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
        title = "ternq conversion report" if self.applied else "ternq conversion plan (dry run, not applied)"
        return "\n".join([
            title, *aligned_table(header, body, right={2}),
            f"{len(self.rows)} layers: {counts or 'none'}; {self.params_quantized:,} of {total:,} layer parameters "
            "quantized",
            f"state_dict {human_bytes(self.bytes_before)} -> ~{human_bytes(self.bytes_after)} packed "
            f"({ratio:.2f}x smaller)",
        ])


def _weight_keys(prefix: str, module: nn.Module) -> list[str]:
    """state_dict keys of a layer that hold its weight (plain, weight_norm g/v, parametrization originals)."""
    spec = layer_spec(module)
    w = spec.weight_name if spec is not None else "weight"
    keys = [k for k in module.state_dict(keep_vars=True)
            if k == w or k.startswith(f"{w}_") or k.startswith(f"parametrizations.{w}.")]
    return [f"{prefix}.{k}" if prefix else k for k in keys]


def _packed_bytes(shape: tuple[int, ...], config: QuantConfig, out_dim: int) -> int:
    numel = math.prod(shape)
    rows = shape[out_dim] if len(shape) > 1 else 1
    fan_in = numel // max(rows, 1)
    n_scales = {"tensor": 1, "channel": rows}.get(config.granularity, rows * math.ceil(fan_in / config.group_size))
    return math.ceil(numel * config.bits_per_weight / 8) + n_scales * _SCALE_BYTES


def _storage_key(key: str, t: Tensor) -> tuple[Any, ...]:
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    return (ptr, t.storage_offset(), tuple(t.shape), t.dtype) if ptr else ("key", key)


@dataclass
class _Entry:
    """A row before its byte sizes are known (they need every entry: tensors may be shared)."""

    row: ReportRow  # bytes_before / bytes_after still 0
    weight_keys: list[str]
    packed: int
    order: tuple[int, int]


def _entry(name: str, type: str, params: int, decision: str, rule: str, path: str, weight_keys: list[str],
           packed: int, order: tuple[int, int] = (0, 0)) -> _Entry:
    return _Entry(ReportRow(name, type, params, decision, rule, path, 0, 0), weight_keys, packed, order)


def _sizes(model: nn.Module, entries: list[_Entry]) -> tuple[int, int, dict[str, int]]:
    """(state_dict bytes, estimated packed bytes, bytes per state_dict key) with shared tensors counted once."""
    quantized = {k for e in entries if e.row.decision != "float" for k in e.weight_keys}
    groups: dict[tuple[Any, ...], list[Any]] = {}
    per_key: dict[str, int] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor):
            continue
        size = t.numel() * t.element_size()
        per_key[key] = size
        group = groups.setdefault(_storage_key(key, t), [size, True])
        group[1] = group[1] and key in quantized
    before = sum(g[0] for g in groups.values())
    after = sum(g[0] for g in groups.values() if not g[1]) + sum(e.packed for e in entries if e.row.decision != "float")
    return before, after, per_key


def _rows_of_converted(model: nn.Module) -> list[_Entry]:
    index = {name: i for i, (name, _) in enumerate(model.named_modules())}
    entries: list[_Entry] = []
    for name, module in model.named_modules():
        if is_quantized(module):
            spec = layer_spec(module)
            weight = module.float_weight()
            entries.append(_entry(name, describe_type(module), sum(p.numel() for p in module.parameters()),
                                  module.qconfig.name, getattr(module, "ternq_rule", "?"),
                                  getattr(module, "ternq_path", "?"), _weight_keys(name, module),
                                  _packed_bytes(tuple(weight.shape), module.qconfig, spec.weight_out_dim),
                                  (index[name], 0)))
        elif isinstance(module, FunctionalQuant):
            owner_name = name.rpartition(".")[0]
            param = model.get_submodule(owner_name).get_parameter(module.param)
            full = f"{owner_name}.{module.param}" if owner_name else module.param
            entries.append(_entry(full, f"F.{module.op}", param.numel(), module.qconfig.name, module.ternq_rule,
                                  module.ternq_path, [full], _packed_bytes(tuple(param.shape), module.qconfig, 0),
                                  (index.get(owner_name, 0), 1)))
        for kept_name, info in module.__dict__.get(KEPT_FLOAT, {}).items():
            full = f"{name}.{kept_name}" if name and kept_name else (name or kept_name)
            anchor = f"{name}.{info['anchor']}" if name and info["anchor"] else (name or info["anchor"])
            functional = info["type"].startswith("F.")
            keys = [full] if functional else (
                _weight_keys(full, model.get_submodule(full)) if full in index else [])
            entries.append(_entry(full, info["type"], info["params"], "float", info["rule"], info["path"], keys, 0,
                                  (index.get(anchor, 0), int(functional))))
    entries.sort(key=lambda e: e.order)
    return entries


def _rows_of_plan(model: nn.Module, include: Any, exclude: Any, config: QuantConfig | None) -> list[_Entry]:
    analysis, decisions = plan(model, include, exclude, config)
    entries = []
    for cand in analysis.candidates:
        d = decisions[cand.name]
        if cand.functional:
            param = cand.module.get_parameter(cand.param)  # type: ignore[arg-type]
            keys, shape, out_dim = [cand.name], tuple(param.shape), 0
        else:
            spec = layer_spec(cand.module)
            keys = _weight_keys(cand.name, cand.module)
            shape, out_dim = tuple(getattr(cand.module, spec.weight_name).shape), spec.weight_out_dim
        packed = 0 if d.config is None else _packed_bytes(shape, d.config, out_dim)
        entries.append(_entry(cand.name, cand.type_name, cand.n_params, "float" if d.config is None else d.config.name,
                              d.rule, cand.path, keys, packed))
    return entries


def report(model: nn.Module, include: Any = None, exclude: Any = None, config: QuantConfig | None = None) -> Report:
    """The conversion report of `model`: one row per candidate layer, with totals.

    On a model converted by `ternq.quantize` (or holding converted submodules), call it with the model alone:
    the rows come from the model. On a float model it is a dry run: the arguments are those of
    `ternq.quantize`, nothing is changed, and ``applied`` is False.

    Example:
        ```python
        print(ternq.report(model))        # aligned table, totals
        ternq.report(model).to_dict()     # the same as JSON-ready data
        ```
    """
    if quantized_parts(model):
        if include is not None or exclude is not None or config is not None:
            raise AlreadyQuantizedError("report(model, include/exclude/config) previews the conversion of a float "
                                        "model; this model is already converted: call report(model)")
        entries, applied = _rows_of_converted(model), True
    else:
        entries, applied = _rows_of_plan(model, include, exclude, config), False
    before, after, per_key = _sizes(model, entries)
    rows = []
    for e in entries:
        weight_bytes = sum(per_key.get(k, 0) for k in e.weight_keys)
        rows.append(replace(e.row, bytes_before=weight_bytes,
                            bytes_after=e.packed if e.row.decision != "float" else weight_bytes))
    return Report(rows, before, after, applied)
