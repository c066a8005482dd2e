"""Packed model files: `pack`, `save_packed`, `load_packed`.

A packed file is a standard safetensors file: every quantized weight is stored as its packed integer codes
(``<key>.codes``, U8; 5 ternary weights per byte) and float32 scales (``<key>.scale``); every other parameter
and buffer of the state_dict is stored as itself. The safetensors ``__metadata__`` carries a JSON *manifest*:
format version, each packed weight's layer, shape, dtype, config and encoding, the layer selection, and a CRC32
of every tensor; the manifest has a CRC32 of its own. docs/format.md specifies the bytes.

`load_packed` needs only the file and a float skeleton of the same architecture: which layers are packed and how
comes from the manifest. It validates the whole header, and the skeleton against it, and checks every tensor as
`ternq verify` does (CRC32, every code byte, every scale: `ternq.format.reader.verify`, 1 MiB at a time) before
changing the skeleton, so a bad file leaves it untouched; then reads one tensor at a time into the skeleton, and
swaps each packed layer for the runtime's int8 inference layer (`ternq.runtime.packed_layer`). Every rule of the
format is checked once, in the torch-free `ternq.format.reader`; this module adds only the skeleton's checks.
A layer's float weight is dropped *before* its codes are decoded, so peak memory never exceeds the float
skeleton's: the layers already swapped hold a quarter of their float bytes, and one layer's decode is in flight.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..config import QuantConfig
from ..errors import ArchitectureMismatchError, ConversionError, FormatError
from ..find.sites import SITES, Kind, Site, relative, sites_of
from ..find.sites import join as _join
from ..qat.functional import (
    READS,
    FunctionalQuant,
    WeightQuant,
    install,
    install_reads,
    install_weights,
    quantize_reads,
)
from ..qat.layers import LayerSpec, QuantMixin, layer_spec
from ..qat.quantizers import dequantize_weight, quantize_weight
from ..qat.surgery import LEGACY_SUFFIXES
from ..qat.weight_attr import QUANTIZERS, latent_parameter
from ..runtime import (
    KERNEL_POLICIES,
    STORAGE_ENV,
    STORAGE_POLICIES,
    PackedFunctional,
    PackedLayer,
    PackedWeightOnly,
    packed_layer,
)
from .atomic import atomic_open
from .encoding import encoding_for, pack_codes
from .reader import (
    DTYPES,
    FORMAT_VERSION,
    KEY_MANIFEST,
    LayerRecord,
    Manifest,
    Source,
    build_metadata,
    check_scale,
    crc32_hex,
    decode_layer,
    effective_group_size,
    read_bytes,
    read_header,
    read_manifest,
    read_metadata,
    verify,
)

__all__ = ["PackedModel", "pack", "save_packed", "load_packed", "read_metadata"]

# safetensors dtype name <-> torch dtype, from the reader's one table (`DTYPES`: name -> numpy dtype); BF16 has
# no numpy dtype (the reader reads its bytes as uint16)
_TORCH_DTYPE = {name: torch.bfloat16 if name == "BF16" else torch.from_numpy(np.empty(0, np.dtype(npd))).dtype
                for name, (npd, _) in DTYPES.items()}
_ST_DTYPE = {dtype: name for name, dtype in _TORCH_DTYPE.items()}
_FLOAT_STORAGE = (None, torch.float32, torch.float16, torch.bfloat16)


# --- what gets packed -------------------------------------------------------------------------------------------


@dataclass
class _PackedSite:
    """One quantized weight on its way into the file: a `Site` plus its codes, scales and state_dict keys."""

    key: str
    module: str
    weight: str
    type: str
    out_dim: int
    codes: Tensor
    scale: Tensor
    config: QuantConfig
    dtype: torch.dtype
    rule: str | None
    owned: set[str] = field(default_factory=set)  # state_dict keys of the float weight (all aliases)
    readers: list[str] = field(default_factory=list)  # other modules whose forward reads the weight
    aliases: set[str] = field(default_factory=set)  # other holders' keys of the same tensor, reading its codes


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _owned_keys(module: nn.Module, weight: str) -> list[str]:
    """Local state_dict keys that hold `weight` (plain, parametrized or legacy weight_norm / spectral_norm)."""
    legacy = {weight + s for s in LEGACY_SUFFIXES}
    return [k for k in module.state_dict(keep_vars=True)
            if k == weight or k in legacy or k.startswith(f"parametrizations.{weight}.")]


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        out.setdefault(id(module), []).append(path)
    return out


def _readers(model: nn.Module) -> dict[str, list[str]]:
    """Weight key -> the modules whose forward reads it through an interception (`ternq.qat.functional.READS`)."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        for path in module.__dict__.get(READS, ()):
            out.setdefault(_join(name, path), []).append(name)
    return out


@dataclass
class _Scan:
    """What the collectors share while scanning a model: aliases, readers, holders of each parameter."""

    model: nn.Module
    aliases: dict[int, list[str]]
    readers: dict[str, list[str]]
    holders: dict[int, int]  # id(parameter) -> how many module attributes hold it
    ties: dict[int, int]  # id(parameter) -> how many of its holders are a tie's followers

    def sole_holder(self, param: Tensor, module: nn.Module) -> bool:
        """Whether only `module` (under any of its names) holds `param`, not counting ties' followers: then its
        float values can go; otherwise other code may read them and the file keeps them in float too."""
        return self.holders.get(id(param), 0) - self.ties.get(id(param), 0) <= len(self.aliases[id(module)])


_Collector = Callable[[_Scan, str, nn.Module], _PackedSite]
#: quantizer class -> how its weight's codes, scales and keys are read for packing; `_collector` looks a module's
#: class up along its MRO, as torchao looks a config's handler up (a new quantizer kind registers one)
_COLLECTORS: dict[type, _Collector] = {}


def _collects(*classes: type) -> Callable[[_Collector], _Collector]:
    def register(collector: _Collector) -> _Collector:
        for cls in classes:
            _COLLECTORS[cls] = collector
        return collector
    return register


def _collector(module: nn.Module) -> _Collector | None:
    for cls in type(module).__mro__:
        if cls in _COLLECTORS:
            return _COLLECTORS[cls]
    return None


@_collects(QuantMixin)
def _qat_layer_site(scan: _Scan, path: str, module: nn.Module) -> _PackedSite:
    with torch.no_grad():
        codes, scale = module.weight_codes()  # type: ignore[operator]
    return _layer_site(scan, path, module, module._ternq_spec, codes, scale,  # type: ignore[arg-type]
                       module.float_weight().dtype)  # type: ignore[operator]


@_collects(PackedLayer)
def _packed_layer_site(scan: _Scan, path: str, module: nn.Module) -> _PackedSite:
    return _layer_site(scan, path, module, module.spec, module.codes, module.scale,  # type: ignore[arg-type]
                       module.float_dtype)  # type: ignore[arg-type]


def _layer_site(scan: _Scan, path: str, module: nn.Module, spec: LayerSpec, codes: Tensor, scale: Tensor,
                dtype: torch.dtype) -> _PackedSite:
    key = _join(path, spec.weight_name)
    site = _PackedSite(key, path, spec.weight_name, _type_name(spec.float_type), spec.weight_out_dim, codes, scale,
                 module.qconfig, dtype, None, readers=scan.readers.get(key, []))  # type: ignore[arg-type]
    local = _owned_keys(module, spec.weight_name)
    site.owned = {_join(alias, k) for alias in scan.aliases[id(module)] for k in local}
    return site


def _quantizer_codes(module: nn.Module, param: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """Codes, scales and float dtype of a functional / weight-only site: a packed quantizer holds them, a QAT
    one computes them from the parameter."""
    if isinstance(module, (PackedFunctional, PackedWeightOnly)):
        return module.codes, module.scale, module.weight_dtype
    with torch.no_grad():
        codes, scale = quantize_weight(param, module.qconfig, module.out_dim)  # type: ignore[arg-type]
    return codes, scale, param.dtype


@_collects(FunctionalQuant)
def _functional_site(scan: _Scan, path: str, module: nn.Module) -> _PackedSite:
    owner_path = path.rpartition(".")[0]
    owner = scan.model.get_submodule(owner_path)
    param = latent_parameter(owner, module.param)  # type: ignore[arg-type]
    codes, scale, dtype = _quantizer_codes(module, param)
    site = _PackedSite(_join(owner_path, module.param), owner_path, module.param, f"F.{module.op}",  # type: ignore[arg-type]
                 module.out_dim, codes, scale, module.qconfig, dtype, None)  # type: ignore[arg-type]
    # a parameter of a submodule (emb.weight of an Embedding kept float) or tied to another one may be read by
    # other code too: it stays stored in float beside its codes
    if "." not in module.param and scan.sole_holder(param, owner):  # type: ignore[operator]
        site.owned = {_join(alias, module.param) for alias in scan.aliases[id(owner)]}  # type: ignore[arg-type]
    return site


@_collects(WeightQuant)
def _weight_site(scan: _Scan, path: str, module: nn.Module) -> _PackedSite:
    holder_path = path.rpartition(".")[0]
    holder = scan.model.get_submodule(holder_path)
    param = holder._parameters[module.param]  # type: ignore[index]
    assert param is not None
    codes, scale, dtype = _quantizer_codes(module, param)
    key = _join(holder_path, module.param)  # type: ignore[arg-type]
    site = _PackedSite(key, holder_path, module.param, "weight", module.out_dim, codes, scale,  # type: ignore[arg-type]
                 module.qconfig, dtype, None, readers=scan.readers.get(key, []))  # type: ignore[arg-type]
    if scan.sole_holder(param, holder):
        site.owned = {_join(alias, module.param) for alias in scan.aliases[id(holder)]}  # type: ignore[arg-type]
    return site


def _collect_sites(model: nn.Module) -> list[_PackedSite]:
    """Every quantized weight of `model`, each read by the collector its quantizer's class registered."""
    holders = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    followers = _tie_followers(model)
    ties = Counter(id(module._parameters[attr]) for module, attr, _ in followers
                   if module._parameters.get(attr) is not None)
    scan = _Scan(model, _aliases(model), _readers(model), holders, ties)
    rules = {_join(prefix, site.key): site.rule for prefix, site in sites_of(model)}  # what quantize() /
    # load_packed() recorded (`ternq.find.sites`)
    sites: list[_PackedSite] = []
    by_quantizer: dict[int, _PackedSite] = {}  # id(the module whose quantizer decides) -> its site
    for path, module in model.named_modules():
        collect = _collector(module)
        if collect is None:
            continue
        site = collect(scan, path, module)
        site.rule = rules.get(site.key)
        sites.append(site)
        by_quantizer[id(module)] = site
    for module, attr, quantizer in followers:  # a tie's other holders read the site's quantized value
        site = by_quantizer.get(id(getattr(quantizer, "__self__", None)))
        if site is not None:
            keys = {_join(alias, attr) for alias in scan.aliases[id(module)]}
            site.owned |= keys
            site.aliases |= keys
    return sites


def _tie_followers(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(module, attribute, quantizer) of each module reading a quantized weight that another module's quantizer
    decides (``b.w = a.w``, `ternq.convert`): not a quantizer of its own on that module."""
    out = []
    for module in model.modules():
        for attr, quantizer in module.__dict__.get(QUANTIZERS, {}).items():
            mine = [m for m in module._modules.values() if isinstance(m, (WeightQuant, FunctionalQuant))
                    and m.param == attr]
            if getattr(quantizer, "__self__", None) not in mine:
                out.append((module, attr, quantizer))
    return out


# --- the in-memory file -----------------------------------------------------------------------------------------


@dataclass
class PackedModel:
    """The content of a packed file, in memory: exactly the tensors and ``__metadata__`` `save_packed` writes.

    Any safetensors writer turns it into a valid ternq file (``safetensors.torch.save_file(p.tensors, path,
    metadata=p.metadata)``); `save` and `to_bytes` write it themselves.
    """

    tensors: dict[str, Tensor]
    metadata: dict[str, str]

    @property
    def manifest(self) -> dict[str, Any]:
        """The decoded manifest (layers, tensors with their CRC32, selection)."""
        return json.loads(self.metadata[KEY_MANIFEST])

    def _layout(self) -> tuple[bytes, list[np.ndarray]]:
        """The 8-byte length + header, and the tensors' bytes in data order (widest dtype first: aligned)."""
        order = sorted(self.tensors, key=lambda k: (-self.tensors[k].element_size(), k))
        entries: dict[str, Any] = {"__metadata__": self.metadata}
        blobs, offset = [], 0
        for name in order:
            t = self.tensors[name]
            blob = _raw_bytes(t)
            entries[name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + blob.nbytes]}
            blobs.append(blob)
            offset += blob.nbytes
        header = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        header += b" " * (-(8 + len(header)) % 8)  # data starts 8-byte aligned, like safetensors writes
        return len(header).to_bytes(8, "little") + header, blobs

    def to_bytes(self) -> bytes:
        """The whole file as bytes."""
        head, blobs = self._layout()
        return b"".join([head, *(b.tobytes() for b in blobs)])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically (`ternq.atomic.atomic_open`): to a temporary file beside it, fsync'ed, then
        renamed over it, keeping an existing file's mode and owner; a character device or FIFO is written
        through, never replaced."""
        head, blobs = self._layout()
        with atomic_open(path) as f:
            f.write(head)
            for blob in blobs:
                f.write(memoryview(blob))


def _raw_bytes(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def pack(model: nn.Module, *, float_dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
         allow_float: bool = False) -> PackedModel:
    """The packed file content of a quantized model (QAT layers, or a model loaded by `load_packed`).

    Args:
        model: a model holding ternq QAT layers / functional quantizers or packed inference layers.
        float_dtype: store the other floating-point parameters and buffers in this dtype (torch.float16 or
            torch.bfloat16) instead of their own; scales are always float32. Loading casts them back to the
            skeleton's dtype.
        metadata: strings to store with the model (e.g. its config as JSON), so the file describes itself.
            Each becomes a key of the safetensors ``__metadata__`` (any key not starting with ``ternq.``;
            prefix your own, e.g. ``"myapp.config"``), and the manifest records each value's CRC32, so readers
            detect a damaged or edited value. Read them back with `ternq.read_metadata` (header only).
        allow_float: write a model without any quantized layer too (every tensor stored as float): a float
            baseline in the same self-describing format. Off by default because packing an unquantized model is
            usually a forgotten `ternq.quantize`.

    Raises:
        ValueError: nothing in `model` is quantized (and not `allow_float`), a tensor has a dtype safetensors
            cannot hold, a state_dict key collides with a packed tensor's name, or a metadata key starts with
            ``ternq.``.
        TypeError: a metadata key or value is not a string.
    """
    if float_dtype not in _FLOAT_STORAGE:
        raise ValueError(f"float_dtype={float_dtype}: expected None, torch.float32, torch.float16 or torch.bfloat16")
    sites = _collect_sites(model)
    if not sites and not allow_float:
        raise ValueError("pack(): the model holds no quantized layer; call ternq.quantize(model) first "
                         "(or pass allow_float=True to store it all in float)")
    state = model.state_dict()
    owned: set[str] = set().union(*(s.owned for s in sites))
    tensors: dict[str, Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}

    def add(name: str, t: Tensor, role: str, orig: torch.dtype | None = None) -> None:
        if name in tensors:
            raise ValueError(f"pack(): tensor name {name!r} is used twice (a state_dict key collides with a "
                             "packed weight's codes or scale)")
        for dtype in (t.dtype, orig):
            if dtype is not None and dtype not in _ST_DTYPE:
                raise ValueError(f"pack(): tensor {name!r} has dtype {dtype}, which a ternq file cannot store")
        t = t.detach().cpu().contiguous()
        tensors[name] = t
        records[name] = {"role": role, "dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                         "crc32": crc32_hex(_raw_bytes(t))}
        if orig is not None:
            records[name]["orig_dtype"] = _ST_DTYPE[orig]

    for s in sites:
        encoding = encoding_for(s.config)
        scale = s.scale.detach().float()
        check_scale(scale.cpu().numpy(), f"pack(): layer {s.key!r}", s.config.qmax)
        add(s.key + ".codes", pack_codes(s.codes, encoding), "codes")
        add(s.key + ".scale", scale, "scale")
        layers[s.key] = {"module": s.module, "type": s.type, "weight": s.weight, "out_dim": s.out_dim,
                         "shape": list(s.codes.shape), "dtype": _ST_DTYPE.get(s.dtype, "F32"),
                         "config": s.config.to_dict(), "encoding": encoding, "count": s.codes.numel(),
                         "codes": s.key + ".codes", "scale": s.key + ".scale"}
        if s.rule is not None:
            layers[s.key]["rule"] = s.rule
        if s.readers:
            layers[s.key]["readers"] = s.readers
        if s.aliases:
            layers[s.key]["aliases"] = sorted(s.aliases)
    first: dict[tuple[Any, ...], str] = {}  # one stored copy per tensor: tied weights are written once
    tied: dict[str, str] = {}
    for key, t in state.items():
        if key in owned:
            continue
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.device.type != "meta" and t.numel() and identity in first:
            tied[key] = first[identity]
            continue
        first[identity] = key
        stored = t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t
        add(key, stored, "float", t.dtype)
    from .. import __version__

    kept = {site.name: site.rule for site in model.__dict__.get(SITES, ()) if site.config is None}
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": f"ternq {__version__}",
        "float_dtype": None if float_dtype is None else _ST_DTYPE[float_dtype],
        "selection": {"quantized": {s.key: s.rule for s in sites},
                      "kept_float": kept},
        "layers": layers,
        "tensors": records,
    }
    if tied:
        manifest["tied"] = tied
    return PackedModel(tensors, build_metadata(manifest, metadata))


def save_packed(model: nn.Module, path: str | os.PathLike[str], *, float_dtype: torch.dtype | None = None,
                metadata: dict[str, str] | None = None, allow_float: bool = False) -> None:
    """Write a quantized model as a packed safetensors file (atomically); see `pack` for the arguments."""
    pack(model, float_dtype=float_dtype, metadata=metadata, allow_float=allow_float).save(path)


# --- loading ----------------------------------------------------------------------------------------------------


@dataclass
class _Placement:
    """Where a packed weight goes in the skeleton (validated before anything is changed)."""

    record: LayerRecord
    config: QuantConfig
    spec: LayerSpec | None  # None for a functional call's parameter
    module: nn.Module | None
    owned: set[str]
    weight: Tensor | None = None  # the skeleton's (latent) weight: a tie's other holders hold it too


def _drop_float_weight(module: nn.Module, name: str) -> None:
    """Replace a plain float weight parameter by a meta tensor of its shape and dtype (no memory), so the layer's
    float bytes are freed before its codes are decoded. Computed weights (weight_norm, parametrizations) are left
    to `packed_layer`, which removes them with the layer."""
    weight = module._parameters.get(name)
    if isinstance(weight, nn.Parameter) and not weight.is_meta:
        module._parameters[name] = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                                requires_grad=weight.requires_grad)


def _read_tensor(source: Source, manifest: Manifest, name: str) -> Tensor:
    """One tensor of the file, CRC32-checked (`ternq.format.reader.read_bytes`), as a torch tensor in its shape."""
    entry = manifest.header.tensors[name]
    return torch.from_numpy(read_bytes(source, manifest, name)).view(_TORCH_DTYPE[entry.dtype]).reshape(entry.shape)


def decode_weight(source: Source, manifest: Manifest, record: LayerRecord) -> tuple[Tensor, Tensor]:
    """Codes (int8, the weight's shape) and float32 scales of a packed weight, every byte checked
    (`ternq.format.reader.decode_layer`, on the same memory)."""
    codes, scale = decode_layer(source, manifest, record)
    return torch.from_numpy(codes), torch.from_numpy(scale)


def _mismatch(source: Source, message: str) -> ArchitectureMismatchError:
    return ArchitectureMismatchError(f"{source.name}: {message}. Load the file into a float skeleton of the model "
                                     "it was saved from")


def _get_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _place(source: Source, model: nn.Module, record: LayerRecord, aliases: dict[int, list[str]],
           floats: set[str]) -> _Placement:
    what = f"layer {record.key!r} ({record.type})"
    config = QuantConfig.from_dict(record.config)  # validated by read_manifest: cannot fail
    if config.granularity == "group" and config.group_size != effective_group_size(record):
        config = dataclasses.replace(config, group_size=effective_group_size(record))  # one group per row
    module = _get_module(model, record.module)
    if module is None:
        raise _mismatch(source, f"the file packs {what}, but the skeleton has no module {record.module!r}")
    for reader in record.readers:
        if _get_module(model, reader) is None:
            raise _mismatch(source, f"{what} is read by module {reader!r}, which the skeleton does not have")
    kind = Kind.of_type(record.type)
    if kind is Kind.WEIGHT:
        weight = module._parameters.get(record.weight)
        if weight is None:
            raise _mismatch(source, f"the file packs {what}, but module {record.module!r} has no parameter "
                                    f"{record.weight!r}")
        spec = None
        owned = {_join(a, record.weight) for a in aliases[id(module)]}
        if owned & floats:  # stored in float too: the parameter stays, with its values
            owned = set()
    elif kind is Kind.FUNCTIONAL:
        spec = layer_spec(module)
        if spec is not None and spec.weight_name == record.weight:
            raise _mismatch(source, f"the file packs {what}, but {record.weight!r} of the skeleton's "
                                    f"{record.module!r} is the weight of a {type(module).__name__} layer, not a "
                                    "parameter of a functional call")
        try:
            weight = latent_parameter(module, record.weight)
        except AttributeError:
            raise _mismatch(source, f"the file packs {what}, but module {record.module!r} has no parameter "
                                    f"{record.weight!r}") from None
        spec = None
        owned = {_join(a, record.weight) for a in aliases[id(module)]}
        if owned & floats:  # stored in float too (see `_collect_sites`): the parameter stays, with its values
            owned = set()
    else:
        spec = layer_spec(module)
        if spec is None or _type_name(spec.float_type) != record.type:
            raise _mismatch(source, f"the file packs {what}, but the skeleton's {record.module!r} is a "
                                    f"{type(module).__name__}")
        if (spec.weight_name, spec.weight_out_dim) != (record.weight, record.out_dim):
            raise _mismatch(source, f"{what}: the file stores weight {record.weight!r} with outputs on dim "
                                    f"{record.out_dim}, the skeleton's layer type uses {spec.weight_name!r} / "
                                    f"dim {spec.weight_out_dim}")
        weight = module.float_weight() if isinstance(module, QuantMixin) else getattr(module, spec.weight_name)
        owned = {_join(a, k) for a in aliases[id(module)] for k in _owned_keys(module, spec.weight_name)}
    if tuple(weight.shape) != record.shape:
        raise _mismatch(source, f"{what}: the file's weight has shape {list(record.shape)}, the skeleton's "
                                f"{list(weight.shape)}")
    for key in record.aliases:  # a tie's other holders read the packed value: nothing float to load for them
        holder_path, _, attr = key.rpartition(".")
        holder = _get_module(model, holder_path)
        if holder is None or holder._parameters.get(attr) is not weight:
            raise _mismatch(source, f"{what} is tied to {key!r} (the same tensor), but the skeleton's {key!r} is "
                                    "missing or another tensor")
        owned.add(key)
    return _Placement(record, config, spec, module, owned, weight)


def _tie_holders(model: nn.Module, record: LayerRecord) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of each of the weight's aliases (``b.w = a.w``), as checked by `_place`."""
    out = []
    for key in record.aliases:
        holder_path, _, attr = key.rpartition(".")
        out.append((model.get_submodule(holder_path), attr))
    return out


def _assign(module: nn.Module, name: str, value: Tensor) -> None:
    """Load `value` into parameter / buffer `name` of `module`: copied in place, or assigned on a meta skeleton."""
    current = module._parameters.get(name)
    if current is not None:
        if current.is_meta:
            module._parameters[name] = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)
        else:
            with torch.no_grad():
                current.copy_(value)
        return
    current = module._buffers[name]
    if current is None or current.is_meta:
        module._buffers[name] = value.to(current.dtype if current is not None else value.dtype)
    else:
        current.copy_(value)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module, aliases: dict[int, list[str]]) -> nn.Module:
    """Put `new` wherever `old` is referenced; returns the (possibly new) root."""
    root = model
    for path in aliases[id(old)]:
        if path == "":
            root = new
            continue
        parent_path, _, attr = path.rpartition(".")
        model.get_submodule(parent_path)._modules[attr] = new
    return root


def load_packed(source: str | os.PathLike[str] | bytes | PackedModel, model: nn.Module, *,
                dequantize: bool = False, progress: bool = False, storage: str | None = None,
                kernel: str | None = None) -> nn.Module:
    """Turn a float skeleton of the saved architecture into the packed inference model the file describes.

    Which layers are packed, and with which config, is read from the file. Everything is validated (header,
    manifest, skeleton: modules, layer types, shapes, the exact set of tensors) and every tensor is checked
    (CRC32, code bytes, scales) before the skeleton is touched, so a corrupted or forged file leaves the skeleton
    unchanged; then each tensor is read (its CRC32 checked again) and loaded. Each packed layer's float weight is
    freed before its codes are decoded, so loading needs no more memory than the float skeleton itself.

    Args:
        source: a file path, the file's bytes, or a `PackedModel` from `pack`.
        model: the float skeleton (a freshly built model; parameters may be on the meta device, then nothing
            is allocated for the weights that get packed). It is modified in place.
        dequantize: instead of int8 inference layers, keep the skeleton's float layers and write the
            hard-quantized weights ``codes * scale`` into them (for interop or to resume training; activation
            quantization is not applied). Needs plain ``weight`` parameters (no weight_norm) in packed layers.
        progress: show a progress bar.
        storage: how packed layers keep their codes: ``"int8"`` (one byte per weight, the fastest prefill),
            ``"packed"`` (2 or 4 bits per weight; 2-bit Linear rows are read as stored: the fastest decode) or
            ``"auto"`` (2-bit rows for the large Linear layers where this CPU's SIMD loop on them is the faster
            decode, else int8: `ternq.runtime.picker.choose_storage`). None: ``$TERNQ_STORAGE``, else "auto".
        kernel: which kernels packed layers run: ``"auto"`` (picked per call from the CPU and the input's shape;
            ``$TERNQ_KERNEL`` can override it for the process), ``"int8"`` (an integer kernel wherever the layer
            has one) or ``"weight_only"`` (dequantize and run the float op). None is "auto". See docs/runtime.md.

    Returns:
        the loaded model: `model` itself, unless `model` is itself the one packed layer.

    Raises:
        FormatError: the file is truncated, corrupted (ChecksumError), inconsistent or of an unknown version.
        ArchitectureMismatchError: the skeleton is not the architecture the file was saved from.
    """
    if storage not in (None, *STORAGE_POLICIES):
        raise ValueError(f"load_packed: storage={storage!r}: expected one of {STORAGE_POLICIES} (or None: "
                         f"${STORAGE_ENV})")
    if kernel not in (None, *KERNEL_POLICIES):
        raise ValueError(f"load_packed: kernel={kernel!r}: expected one of {KERNEL_POLICIES} (or None: 'auto')")
    options = {"storage": storage, "kernel": kernel}
    data = source.to_bytes() if isinstance(source, PackedModel) else source
    with Source(data) as src:
        manifest = read_manifest(read_header(src))
        aliases = _aliases(model)
        floats = [r.name for r in manifest.tensors.values() if r.role == "float"]
        placements = [_place(src, model, r, aliases, set(floats)) for r in manifest.layers.values()]
        seen: dict[int, str] = {}
        for p in placements:
            if p.spec is not None and seen.setdefault(id(p.module), p.record.key) != p.record.key:
                raise FormatError(f"{src.name}: layers {seen[id(p.module)]!r} and {p.record.key!r} are the same "
                                  "module of the skeleton")
        owned = set().union(*(p.owned for p in placements))
        _check_floats(src, manifest, model, owned)
        if dequantize:
            _check_dequantizable(src, placements)
        verify(src, manifest)  # every CRC, code byte and scale: after this, nothing can fail half-way
        steps: Iterable[Any] = [*floats, *placements]
        if progress:
            steps = tqdm(steps, desc="loading", unit="tensor")
        leftovers: dict[str, Tensor] = {}
        tied: dict[int, tuple[Tensor, nn.Parameter]] = {}
        root = model
        for step in steps:
            if isinstance(step, str):
                _load_float(src, manifest, model, step, leftovers)
                for key in [k for k, target in manifest.tied.items() if target == step]:
                    _load_float(src, manifest, model, step, leftovers, into=key)
            else:
                root = _load_layer(src, manifest, root, step, aliases, dequantize, tied, options)
                step.module = step.weight = None  # the float layer can go now: peak memory stays the skeleton's
        if leftovers:
            root.load_state_dict(leftovers, strict=False)
    if not dequantize:
        root.__dict__[SITES] = _loaded_sites(manifest, root)
        _refuse_hub_saving(root)
    return root


def _loaded_sites(manifest: Manifest, root: nn.Module) -> list[Site]:
    """The `Site` record of a loaded model, from its manifest: `report` and a later `pack` read it."""
    sites = []
    for record in manifest.layers.values():
        kind = Kind.of_type(record.type)
        name = record.module if kind is Kind.LAYER else record.key
        sites.append(Site(name, record.key, kind, record.type.rpartition(".")[2] if kind is Kind.LAYER else record.type,
                          record.count, QuantConfig.from_dict(record.config), record.rule or "-", "packed",
                          out_dim=record.out_dim))
    kept = manifest.selection.get("kept_float") if isinstance(manifest.selection, dict) else None
    for name, rule in (kept.items() if isinstance(kept, dict) else ()):  # informative: trusted for nothing
        if not isinstance(name, str) or not isinstance(rule, str):
            continue
        module = _get_module(root, name)
        spec = layer_spec(module) if module is not None else None
        if spec is not None:  # a layer kept float
            sites.append(Site(name, _join(name, spec.weight_name), Kind.LAYER, type(module).__name__,
                              sum(p.numel() for p in module.parameters()), None, rule, "packed"))
        else:
            try:
                param = latent_parameter(root, name)
            except AttributeError:
                continue  # not a weight of this skeleton: nothing to say about it
            sites.append(Site(name, name, Kind.WEIGHT, "parameter", param.numel(), None, rule, "packed"))
    return sites


#: methods of a Hugging Face model that would write its state_dict as float weights: a packed model has none
_HUB_SAVERS = ("save_pretrained", "push_to_hub")


def _refuse_hub_saving(model: nn.Module) -> None:
    """A packed model's ``save_pretrained`` raises instead of writing a checkpoint without its weights."""
    for name in _HUB_SAVERS:
        if callable(getattr(model, name, None)):
            model.__dict__[name] = functools.partial(_hub_saving_refused, name)


def _hub_saving_refused(method: str, *args: Any, **kwargs: Any) -> None:
    raise ConversionError(
        f"{method}() on a packed ternq model would write a checkpoint without its quantized weights (packed layers "
        "hold codes, not float weights). Save the packed file and the config instead: "
        "ternq.save_packed(model, 'model.safetensors'); model.config.save_pretrained(directory). Load them with "
        "ternq.load_packed('model.safetensors', AutoModel.from_config(AutoConfig.from_pretrained(directory))) "
        "(see docs/transformers.md), or load with dequantize=True for a float model that save_pretrained can write")


def _check_floats(source: Source, manifest: Manifest, model: nn.Module, owned: set[str]) -> None:
    state = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in state.items() if k not in owned}
    del state
    stored = {r.name: r.shape for r in manifest.tensors.values() if r.role == "float"}
    stored.update({key: stored[target] for key, target in manifest.tied.items()})
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        raise _mismatch(source, f"the skeleton's tensor {missing[0]!r} is not in the file"
                                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise _mismatch(source, f"the file's tensor {extra[0]!r} has no place in the skeleton"
                                + (f" (nor {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in stored.items():
        if expected[name] != shape:
            raise _mismatch(source, f"tensor {name!r} has shape {list(shape)} in the file, {list(expected[name])} "
                                    "in the skeleton")


def _check_dequantizable(source: Source, placements: list[_Placement]) -> None:
    for p in placements:
        assert p.module is not None
        if p.spec is not None and not isinstance(p.module._parameters.get(p.record.weight), nn.Parameter):
            raise ArchitectureMismatchError(
                f"{source.name}: load_packed(dequantize=True) writes plain weights, but layer {p.record.key!r} of "
                "the skeleton computes its weight (weight_norm / spectral_norm): build the skeleton without them, "
                "or load without dequantize")


def _load_float(source: Source, manifest: Manifest, model: nn.Module, name: str, leftovers: dict[str, Tensor],
                into: str | None = None) -> None:
    """Load float tensor `name` into state_dict key `into` (default: the same key; a tied key otherwise)."""
    value = _read_tensor(source, manifest, name)
    name = into or name
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    if attr in module._parameters or attr in module._buffers:
        _assign(module, attr, value)
    else:  # a key of a module's own _save_to_state_dict: let load_state_dict place it
        leftovers[name] = value


def _load_layer(source: Source, manifest: Manifest, root: nn.Module, p: _Placement,
                aliases: dict[int, list[str]], dequantize: bool,
                tied: dict[int, tuple[Tensor, nn.Parameter]], options: dict[str, str | None]) -> nn.Module:
    """`tied`: skeleton weight Parameter (by id) -> (it, the new Parameter loaded for it), so that weights tied
    between packed layers stay tied under ``dequantize=True`` (a float module sharing it keeps the float one)."""
    assert p.module is not None
    weight = p.module._parameters.get(p.record.weight) if p.spec is not None else None
    if p.spec is not None:
        _drop_float_weight(p.module, p.record.weight)
    codes, scale = decode_weight(source, manifest, p.record)
    dtype = _TORCH_DTYPE[p.record.dtype]
    ties = _tie_holders(root, p.record)
    if p.spec is None:
        out_dim = p.record.out_dim
        if dequantize:
            _assign(p.module, p.record.weight, dequantize_weight(codes, scale, p.config, out_dim, dtype))
            holder_path, _, attr = p.record.weight.rpartition(".")
            value = p.module.get_submodule(holder_path)._parameters[attr]
            for reader, name in ties:
                reader._parameters[name] = value
        elif Kind.of_type(p.record.type) is Kind.WEIGHT:
            wq = _install_packed_weight(root, p.module, p.record, codes, scale, p.config, dtype, keep=not p.owned)
            _follow(ties, p.module._parameters[p.record.weight], wq.quantized)
        else:
            fq = _install_packed_functional(p.module, p.record, codes, scale, p.config, dtype, keep=not p.owned,
                                            options=options)
            _follow(ties, latent_parameter(p.module, p.record.weight), fq.read_value)
        return root
    if dequantize:
        assert weight is not None
        value = dequantize_weight(codes, scale, p.config, p.record.out_dim, weight.dtype)
        first = tied.get(id(weight))
        if first is not None and torch.equal(first[1], value):  # shared with an earlier layer: keep sharing it
            p.module._parameters[p.record.weight] = first[1]
        else:
            param = nn.Parameter(value, requires_grad=weight.requires_grad)
            p.module._parameters[p.record.weight] = param
            tied.setdefault(id(weight), (weight, param))
        for holder, name in ties:  # a tie's other holders: the same new Parameter
            holder._parameters[name] = p.module._parameters[p.record.weight]
        return root
    new = packed_layer(p.module, codes, scale, p.config, p.spec, **options)
    root = _replace(root, p.module, new, aliases)
    _install_readers(root, p.record)  # a parent reading the layer's weight: its fast path stays off
    placeholder = torch.zeros((), dtype=dtype).expand(p.record.shape)
    _follow(ties, nn.Parameter(placeholder, requires_grad=False), new.read_weight)  # type: ignore[attr-defined]
    return root


def _follow(ties: list[tuple[nn.Module, str]], latent: Tensor, quantized: Any) -> None:
    """A tie's other holders hold the packed site's latent (a placeholder, or the float weight kept beside its
    codes) and read its quantized value."""
    for reader, attr in ties:
        reader._parameters[attr] = latent
        quantize_reads(reader, attr, quantized)


def _install_readers(root: nn.Module, record: LayerRecord) -> None:
    for reader in record.readers:
        install_reads(root.get_submodule(reader), [relative(record.key, reader)])  # fast paths stay off


def _install_packed_weight(root: nn.Module, holder: nn.Module, record: LayerRecord, codes: Tensor, scale: Tensor,
                           config: QuantConfig, dtype: torch.dtype, keep: bool) -> PackedWeightOnly:
    _make_room(holder, holder, record.weight, record.shape, dtype, WeightQuant, keep)
    packed = PackedWeightOnly(record.weight, config, record.out_dim, codes, scale, dtype)
    install_weights(holder, [packed])
    _install_readers(root, record)
    return packed


def _install_packed_functional(owner: nn.Module, record: LayerRecord, codes: Tensor, scale: Tensor,
                               config: QuantConfig, dtype: torch.dtype, keep: bool = False,
                               options: dict[str, str | None] | None = None) -> PackedFunctional:
    op = record.type.removeprefix("F.")  # one of FUNCTIONAL_TYPES: read_manifest refuses any other
    _make_room(owner, owner.get_submodule(record.weight.rpartition(".")[0]), record.weight, record.shape, dtype,
               FunctionalQuant, keep)
    packed = PackedFunctional(op, record.weight, config, codes, scale, dtype, **(options or {}))
    install(owner, [packed])
    if "." not in record.weight:  # the owner's own parameter: every read of it gives codes * scale
        quantize_reads(owner, record.weight, packed.read_value)
    return packed


def _make_room(owner: nn.Module, holder: nn.Module, path: str, shape: tuple[int, ...], dtype: torch.dtype,
               quantizer: type[nn.Module], keep: bool) -> None:
    """Before a packed quantizer is installed on `owner` for parameter `path`: the parameter becomes a zero-stride
    placeholder of its shape (no memory), unless `keep` (loaded in float too: other code reads it), and a QAT
    skeleton's own quantizer of it goes."""
    if not keep:
        placeholder = torch.zeros((), dtype=dtype).expand(shape)
        holder._parameters[path.rpartition(".")[2]] = nn.Parameter(placeholder, requires_grad=False)
    for name, module in list(owner._modules.items()):
        if isinstance(module, quantizer) and module.param == path:
            del owner._modules[name]

