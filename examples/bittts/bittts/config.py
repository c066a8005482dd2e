"""BitTTS configuration: one dataclass per model part, bundled in `BitTTSConfig`, loaded from TOML presets.

A preset (``bittts/presets/<name>.toml``) only lists what differs from the dataclass defaults; the defaults are
the paper's architecture (JETS with a 4-layer conv encoder/decoder, HiFi-GAN with initial channel 128).
Unknown sections or keys are an error, so a typo in a preset never silently trains the wrong model.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, get_type_hints

import tomli_w

from ternq.atomic import atomic_write
from ternq.config import QuantConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

PRESETS = ("fp32", "acoustic", "all", "4bit", "fp32-small", "tiny")


@dataclass
class AcousticConfig:
    """JETS acoustic model with the paper's conv encoder/decoder (transformer blocks replaced by convolutions).

    Attributes:
        n_symbols: phoneme vocabulary size (embedding rows). 0 = take it from the training data's symbol table.
        enc_channels, enc_layers, enc_kernel: encoder width, depth and kernel (paper: 256, 4, 5).
        dec_channels, dec_layers, dec_kernel: decoder width, depth and kernel (paper: 192, 4, 5); the decoder
            output (dec_channels wide) is what the vocoder reads, as in JETS.
        norm: normalization inside residual blocks: "rmsnorm" (BitJETS-M4's choice for ternary training) or
            "layernorm".
        dropout: dropout in encoder/decoder blocks.
        variance_channels, variance_layers, variance_kernel, variance_dropout: the duration, pitch and energy
            predictors (FastSpeech 2 style conv stacks).
        mdn_components: Gaussian components of the MDN duration predictor (mixture over log-duration).
        aligner_channels: width of the alignment module (training only; not used by `infer`).
        align_prior: scaling of the beta-binomial diagonal prior added to the soft alignment in training
            (Badlani et al. 2021, "One TTS alignment to rule them all"); 0 = none.
        max_duration: cap (frames) on one predicted phoneme duration at inference.
        n_mels: mel bins of the aligner's acoustic input.
    """

    n_symbols: int = 0
    enc_channels: int = 256
    enc_layers: int = 4
    enc_kernel: int = 5
    dec_channels: int = 192
    dec_layers: int = 4
    dec_kernel: int = 5
    norm: str = "rmsnorm"
    dropout: float = 0.1
    variance_channels: int = 256
    variance_layers: int = 2
    variance_kernel: int = 3
    variance_dropout: float = 0.5
    mdn_components: int = 4
    aligner_channels: int = 256
    align_prior: float = 1.0
    max_duration: int = 100
    n_mels: int = 80

    def __post_init__(self) -> None:
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"acoustic.norm={self.norm!r}: expected 'rmsnorm' or 'layernorm'")
        for name in ("enc_kernel", "dec_kernel", "variance_kernel"):
            if getattr(self, name) % 2 != 1:
                raise ValueError(f"acoustic.{name}={getattr(self, name)}: expected an odd kernel size")


@dataclass
class VocoderConfig:
    """HiFi-GAN generator (V1 layout, "resblock 1"); the product of `upsample_rates` must equal the hop (256)."""

    initial_channels: int = 128
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernels: tuple[int, ...] = (16, 16, 4, 4)
    resblock_kernels: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    weight_norm: bool = True

    def __post_init__(self) -> None:
        if len(self.upsample_rates) != len(self.upsample_kernels):
            raise ValueError("vocoder.upsample_rates and vocoder.upsample_kernels must have the same length")
        if len(self.resblock_kernels) != len(self.resblock_dilations):
            raise ValueError("vocoder.resblock_kernels and vocoder.resblock_dilations must have the same length")
        if self.initial_channels % 2 ** len(self.upsample_rates):
            raise ValueError(f"vocoder.initial_channels={self.initial_channels} must be divisible by "
                             f"2**{len(self.upsample_rates)} (channels halve at every upsampling)")

    @property
    def hop(self) -> int:
        out = 1
        for r in self.upsample_rates:
            out *= r
        return out


@dataclass
class DiscriminatorConfig:
    """HiFi-GAN multi-period (MPD) and multi-scale (MSD) discriminators. Training only, never exported.

    The defaults are the original HiFi-GAN sizes (about 41 M + 29 M parameters); presets may shrink them.
    `msd_groups[i]` is the group count of MSD conv i (must divide its in and out channels).
    """

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    mpd_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    msd_scales: int = 3
    msd_channels: tuple[int, ...] = (128, 128, 256, 512, 1024, 1024, 1024)
    msd_kernels: tuple[int, ...] = (15, 41, 41, 41, 41, 41, 5)
    msd_strides: tuple[int, ...] = (1, 2, 2, 4, 4, 1, 1)
    msd_groups: tuple[int, ...] = (1, 4, 16, 16, 16, 16, 1)

    def __post_init__(self) -> None:
        n = len(self.msd_channels)
        if not (len(self.msd_kernels) == len(self.msd_strides) == len(self.msd_groups) == n):
            raise ValueError("discriminator.msd_channels/kernels/strides/groups must have the same length")
        prev = 1
        for i, (c, g) in enumerate(zip(self.msd_channels, self.msd_groups)):
            if prev % g or c % g:
                raise ValueError(f"discriminator.msd_groups[{i}]={g} must divide in={prev} and out={c} channels")
            prev = c
        if self.msd_scales < 0 or (not self.periods and self.msd_scales == 0):
            raise ValueError("discriminator: need at least one period or one scale")


@dataclass
class LossConfig:
    """Loss weights (JETS / HiFi-GAN values).

    The binarization loss is off for the first `bin_loss_start` steps, then its weight ramps linearly to 1 over
    `bin_loss_ramp` steps (as RAD-TTS / Badlani et al. enable it once the soft alignment has formed): from step 0
    it pulls the soft alignment onto MAS's early, arbitrary paths and the alignment collapses onto a few tokens.

    Three knobs for short (CPU) budgets, all off in the paper recipe:
    `adv_start`: optimizer steps of reconstruction-only training before the discriminators join (UnivNet and VITS
    style warm-up; the discriminators cost more than the generator on a CPU, and adversarial terms only refine
    audio that the mel loss has already made intelligible). `lambda_mel_aux`: weight of an L1 loss between the
    target log-mel and a training-only 1x1 projection of the decoder output (`BitTTS.mel_head`, dropped at
    export), which gives the acoustic model a direct per-frame target on every frame, not only through the
    vocoder on a short segment. `lambda_stft`: weight of Parallel WaveGAN's multi-resolution STFT loss on the
    vocoder segment (`losses.stft_loss`), a cheap help against the buzz of a vocoder trained on mel L1 alone.
    """

    lambda_mel: float = 45.0
    lambda_adv: float = 1.0
    lambda_fm: float = 2.0
    lambda_dur: float = 1.0
    lambda_pitch: float = 1.0
    lambda_energy: float = 1.0
    lambda_align: float = 2.0  # forward-sum + binarization
    bin_loss_start: int = 5000
    bin_loss_ramp: int = 5000
    adv_start: int = 0
    lambda_mel_aux: float = 0.0
    lambda_stft: float = 0.0

    def __post_init__(self) -> None:
        if self.adv_start < 0 or self.lambda_mel_aux < 0 or self.lambda_stft < 0:
            raise ValueError("loss.adv_start, loss.lambda_mel_aux and loss.lambda_stft must be >= 0")


@dataclass
class QuantizationConfig:
    """Which layers ternq quantizes (`scope`, `exclude`) and how (`config`: ternq's own config; None = float).

    Attributes:
        scope: "acoustic" (acoustic model only, the paper's 70 % setting) or "all" (acoustic model and vocoder,
            except the vocoder's output layer, the paper's 83 % setting). The training-only alignment module
            always stays float.
        exclude: extra ternq selectors (globs, "re:..." regexes) kept in float.
        config: a `ternq.TernaryConfig` / `ternq.KBitConfig`, or None for a float model. In a config file it is
            the table ``[quant.config]``: ternq's own record of a config (`QuantConfig.to_dict`, read back by
            `QuantConfig.from_dict`), e.g. ``kind = "kbit"`` and ``bits = 4``; fields left out take ternq's
            defaults, and the table replaces a base preset's whole. TOML has no null, so a field ternq sets to
            None (``act_bits``, ``input_norm``) is written ``false``. An empty table is a float model.

    Configs written before `[quant]` held ternq's config (``scheme``, ``bits``, ``granularity``, ``input_norm``,
    ``act_bits`` keys) are read through `upgrade_quant`.
    """

    scope: str = "acoustic"
    exclude: tuple[str, ...] = ()
    config: QuantConfig | None = None

    def __post_init__(self) -> None:
        if self.scope not in ("acoustic", "all"):
            raise ValueError(f"quant.scope={self.scope!r}: expected 'acoustic' or 'all'")
        if isinstance(self.config, dict):
            fields = {k: None if v is False else v for k, v in self.config.items()}  # false: TOML's None
            try:
                self.config = QuantConfig.from_dict(fields) if fields else None
            except ValueError as e:
                raise ValueError(f"quant.config: {e}") from None
        elif self.config is not None and not isinstance(self.config, QuantConfig):
            raise ValueError(f"quant.config={self.config!r}: expected a table of ternq config fields "
                             '(e.g. {kind = "ternary"}), or an empty table for a float model')

    @property
    def scheme(self) -> str:
        """"none" (float) or the ternq config's kind ("ternary", "kbit"): the label logs and reports print."""
        return "none" if self.config is None else self.config.kind


@dataclass
class TrainConfig:
    """Optimization and bookkeeping.

    Attributes:
        batch_size: utterances per process and micro-step; the effective batch is
            batch_size * grad_accum * world_size.
        segment_frames: length (mel frames) of the random decoder-output segment fed to the vocoder
            (32 frames = 8192 samples, HiFi-GAN's segment).
        lr, betas, adam_eps, weight_decay: AdamW for generator and discriminators (HiFi-GAN values).
        lr_decay: ExponentialLR gamma, applied after every optimizer step.
        grad_clip: clip the global grad norm of each network to this value (0 = off).
        max_nonfinite: abort after this many consecutive steps with a non-finite loss or gradient.
        log_every, image_every, ckpt_every: in optimizer steps (0 = never, except the final checkpoint).
        steps: total optimizer steps (`--steps` overrides).
        aligner_warmup: aligner-only steps before the first joint step of a run warm-started from a model
            without an aligner (an export; see `bittts.training.warmstart`).
        threads: torch intra-op CPU threads during training (0 = torch's default). Small models are fastest on
            one thread, and multi-threaded tiny ops slow down many times over when other processes share the
            cores, so the `tiny` preset uses 1.
    """

    batch_size: int = 16
    segment_frames: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.8, 0.99)
    adam_eps: float = 1e-9
    weight_decay: float = 0.01
    lr_decay: float = 0.99999
    grad_clip: float = 10.0
    max_nonfinite: int = 5
    log_every: int = 10
    image_every: int = 1000
    ckpt_every: int = 1000
    steps: int = 200_000
    seed: int = 1234
    num_workers: int = 0
    threads: int = 0
    aligner_warmup: int = 500

    def __post_init__(self) -> None:
        for name in ("batch_size", "segment_frames", "grad_accum", "steps", "max_nonfinite"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: expected a positive int")


@dataclass
class BitTTSConfig:
    """Everything needed to rebuild and retrain a BitTTS model; stored in every checkpoint."""

    name: str = "custom"
    acoustic: AcousticConfig = field(default_factory=AcousticConfig)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    quant: QuantizationConfig = field(default_factory=QuantizationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(BitTTSConfig) if f.name != "name"}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn a TOML value into the field's type (lists -> tuples, ints -> floats), or raise naming the key."""
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = hint.__args__
        if len(args) == 2 and args[1] is Ellipsis:
            hints = [args[0]] * len(value)
        elif len(args) == len(value):
            hints = list(args)
        else:
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, hints)))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _section_from_dict(cls: type, data: dict[str, Any], section: str) -> Any:
    hints = get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in [{section}]; known: {sorted(hints)}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()})


# [quant] keys of the schema before [quant] held ternq's config: bittts' own encoding of it
_OLD_QUANT_KEYS = ("scheme", "bits", "granularity", "input_norm", "act_bits")


def upgrade_quant(section: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A [quant] section as bittts wrote it before it held ternq's config -> the current form.

    The old schema (scheme "none" / "ternary" / "kbit", bits, granularity, input_norm "none" = off, act_bits
    0 = off, next to scope and exclude) is in every training checkpoint, run config.toml and exported model
    (the shipped ones included) made before the change, and in old `--set quant.KEY=...` overrides. Old keys a
    section leaves out keep the meaning they had on top of `base` (the current-form section it overrides).
    A section without old keys is returned as it is.
    """
    if not isinstance(section, dict) or not set(section) & set(_OLD_QUANT_KEYS):
        return section
    new = {k: v for k, v in section.items() if k not in _OLD_QUANT_KEYS}
    config = dict(new.get("config", base.get("config", {})))
    scheme = section.get("scheme", config.get("kind", "none"))
    if scheme not in ("none", "ternary", "kbit"):
        raise ValueError(f"quant.scheme={scheme!r}: expected 'none', 'ternary' or 'kbit'")
    if scheme == "none":
        return {**new, "config": {}}
    config["kind"] = scheme
    if scheme == "ternary":
        config.pop("bits", None)  # the old schema kept bits for every scheme; ternary ignored it
    elif "bits" in section:
        config["bits"] = section["bits"]
    if "granularity" in section:
        config["granularity"] = section["granularity"]
    if "input_norm" in section:
        config["input_norm"] = None if section["input_norm"] == "none" else section["input_norm"]
    if "act_bits" in section:
        config["act_bits"] = section["act_bits"] or None
    return {**new, "config": config}


def config_from_dict(data: dict[str, Any], base: BitTTSConfig | None = None) -> BitTTSConfig:
    """Build a config from nested dicts (TOML / checkpoint form); keys not given keep `base`'s values."""
    base_data = config_to_dict(base or BitTTSConfig())
    unknown = set(data) - set(_SECTIONS) - {"name"}
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)} and 'name'")
    out = {"name": str(data.get("name", base_data["name"]))}
    hints = get_type_hints(BitTTSConfig)
    for section in _SECTIONS:
        given = data.get(section, {})
        if section == "quant":
            given = upgrade_quant(given, base_data["quant"])
        out[section] = _section_from_dict(hints[section], {**base_data[section], **given}, section)
    return BitTTSConfig(**out)


def config_to_dict(cfg: BitTTSConfig) -> dict[str, Any]:
    """Plain nested dict (tuples become lists, the ternq config its `to_dict()`, absent when None), safe for
    torch.save and json; `dump_config` makes TOML of it."""
    def plain(v: Any) -> Any:
        if isinstance(v, QuantConfig):
            return v.to_dict()
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    def section(obj: Any) -> dict[str, Any]:
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {k: plain(v) for k, v in values.items() if v is not None}
    return {"name": cfg.name, **{s: section(getattr(cfg, s)) for s in _SECTIONS}}


def config_diff(a: BitTTSConfig, b: BitTTSConfig, sections: tuple[str, ...] = tuple(_SECTIONS),
                ignore: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """"section.key: a's value vs b's value" for each value of `sections` that differs (keys in `ignore[section]`
    left out): what an error about two configs that must match names."""
    da, db = config_to_dict(a), config_to_dict(b)
    ignore = ignore or {}
    return [f"{section}.{k}: {da[section].get(k)!r} vs {db[section].get(k)!r}"
            for section in sections for k in {**da[section], **db[section]}
            if k not in ignore.get(section, ()) and da[section].get(k) != db[section].get(k)]


def load_config(path: str | os.PathLike) -> BitTTSConfig:
    """Read a TOML config file (a preset or a run's config.toml).

    A top-level ``base = "<preset>"`` starts from that preset instead of the dataclass defaults.
    """
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    base_name = data.pop("base", None)
    base = None
    if base_name is not None:
        if not isinstance(base_name, str):
            raise ValueError(f"{path}: base = {base_name!r}: expected a preset name")
        base = load_preset(base_name)
    return config_from_dict(data, base)


def load_preset(name: str) -> BitTTSConfig:
    """One of `PRESETS` ("fp32", "acoustic", "all", "4bit", "fp32-small", "tiny")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    with resources.as_file(resources.files("bittts") / "presets" / f"{name}.toml") as path:
        cfg = load_config(path)
    cfg.name = name
    return cfg


def apply_overrides(cfg: BitTTSConfig, overrides: list[str]) -> BitTTSConfig:
    """Apply ``section.key=value`` strings (value in TOML syntax, e.g. ``train.batch_size=4``); a key may go
    into a table, e.g. ``quant.config.granularity=channel``."""
    data = config_to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.batch_size=4")
        if section not in _SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {section!r}; known: {sorted(_SECTIONS)}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare strings need no quotes: quant.config.kind=ternary
        *tables, leaf = name.split(".")
        target = data[section]
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {section}.{table} is not a table")
        target[leaf] = value
    return config_from_dict(data)


def dump_config(cfg: BitTTSConfig) -> str:
    """TOML text that `load_config` reads back to an equal config."""
    data = config_to_dict(cfg)
    if "config" in data["quant"]:  # TOML has no null: ternq's None fields are written false
        data["quant"]["config"] = {k: False if v is None else v for k, v in data["quant"]["config"].items()}
    return tomli_w.dumps(data)


def save_config(cfg: BitTTSConfig, path: str | os.PathLike) -> None:
    """Write `dump_config(cfg)` atomically (temp file + os.replace)."""
    atomic_write(path, dump_config(cfg).encode())
