"""BitTTS = JETS acoustic model + HiFi-GAN generator, trained end to end; quantization presets via ternq.

`BitTTS` is a plain nn.Module with two submodules, `acoustic` and `vocoder`:

- `forward(batch)` (training): teacher-forced acoustic pass, then the vocoder on a random segment of the decoder
  output; returns the generated segment, the matching real waveform segment and the acoustic model's losses.
- `infer(phoneme_ids)` (synthesis): durations from the MDN duration predictor, predicted pitch and energy,
  the whole utterance through the vocoder.

The GAN discriminators are a separate object (`bittts.discriminators.Discriminators`), so exporting BitTTS never
includes them. `build_model(cfg)` builds the model and applies `cfg.quant` through `apply_quantization`, the one
place that talks to ternq.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from .acoustic import AcousticModel, sequence_mask
from .config import BitTTSConfig, QuantizationConfig, config_from_dict
from .vocoder import HiFiGANGenerator, remove_weight_norm

__all__ = ["BitTTS", "build_model", "apply_quantization", "parameter_counts", "load_checkpoint",
           "model_from_checkpoint", "ALWAYS_FLOAT", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "bittts-checkpoint"

# Never quantized: the alignment module is training-only (not used by `infer`, dropped by
# `strip_for_inference`), and the pitch/energy embeddings are 1-input-channel convs, whose input a ternq
# input norm (normalizing over channels) would turn into zeros.
ALWAYS_FLOAT = ("acoustic.aligner.*", "acoustic.pitch_embed", "acoustic.energy_embed")


class BitTTS(nn.Module):
    """Text (phoneme ids) to waveform. See the module docstring."""

    def __init__(self, cfg: BitTTSConfig) -> None:
        super().__init__()
        if cfg.vocoder.hop != 256:
            raise ValueError(f"vocoder.upsample_rates multiply to {cfg.vocoder.hop}; they must give the hop, 256")
        self.cfg = cfg
        self.acoustic = AcousticModel(cfg.acoustic)
        self.vocoder = HiFiGANGenerator(cfg.vocoder, cfg.acoustic.dec_channels)
        # training-only shortcut target for the decoder (see LossConfig.lambda_mel_aux); never exported
        self.mel_head = (nn.Conv1d(cfg.acoustic.dec_channels, cfg.acoustic.n_mels, 1)
                         if cfg.loss.lambda_mel_aux > 0 else None)

    @property
    def hop(self) -> int:
        return self.vocoder.hop

    def forward(self, batch: dict[str, Any], segment_frames: int | None = None) -> dict[str, Any]:
        """Training pass on a collated batch (see `bittts.data.collate`).

        Returns the acoustic model's outputs and losses (see `AcousticModel.forward`) plus
        "wav_hat" (B, 1, S * hop) the vocoder output on a random S-frame segment of the decoder output,
        "wav" (B, 1, S * hop) the real waveform under that segment, and "segment_starts" (B,) in frames.
        S = `segment_frames` (default cfg.train.segment_frames); segment starts come from torch's global RNG.
        With a `mel_head`, also "loss_mel_aux": L1 between its projection of the decoder output and the target mel
        over the valid frames.
        """
        for key in ("phonemes", "phoneme_lengths", "mel", "mel_lengths", "pitch", "energy", "wav"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r}; build batches with bittts.data.collate")
        out = self.acoustic(batch["phonemes"], batch["phoneme_lengths"], batch["mel"], batch["mel_lengths"],
                            batch["pitch"], batch["energy"])
        if self.mel_head is not None:
            mask = sequence_mask(batch["mel_lengths"], batch["mel"].shape[2]).unsqueeze(1).to(batch["mel"].dtype)
            err = (self.mel_head(out["hidden"]) - batch["mel"]).abs() * mask
            out["loss_mel_aux"] = err.sum() / (mask.sum() * batch["mel"].shape[1]).clamp_min(1)
        seg = int(segment_frames or self.cfg.train.segment_frames)
        starts = random_segment_starts(batch["mel_lengths"], seg)
        out["segment_starts"] = starts
        out["wav"] = slice_segments(batch["wav"], starts.to(batch["wav"].device) * self.hop, seg * self.hop)
        out["wav_hat"] = self.vocoder(slice_segments(out["hidden"], starts.to(out["hidden"].device), seg))
        return out

    @torch.no_grad()
    def infer(self, phoneme_ids: Tensor, phoneme_lengths: Tensor | None = None, *, duration_scale: float = 1.0,
              duration_mode: str = "mean", return_lengths: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Synthesize waveforms from phoneme ids (call `model.eval()` first).

        Args:
            phoneme_ids: (T_text,) or (B, T_text) int ids, 0 = padding.
            phoneme_lengths: (B,) valid lengths; default all T_text.
            duration_scale: multiply predicted durations (>1 = slower speech).
            duration_mode: "mean" (mixture mean of log-duration, default) or "mode" (mean of the most probable
                MDN component); see `MDNDurationPredictor.predict`.
            return_lengths: also return the valid samples per item.

        Returns:
            wav (B, 1, T_samples) in [-1, 1], zero past each item's length (and lengths (B,) if asked).
        """
        ids = phoneme_ids.unsqueeze(0) if phoneme_ids.dim() == 1 else phoneme_ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"phoneme_ids must be (T_text,) or (B, T_text) with T_text > 0, got {tuple(ids.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"phoneme_ids must be integer ids, got {ids.dtype}")
        n = self.cfg.acoustic.n_symbols
        if int(ids.min()) < 0 or int(ids.max()) >= n:
            raise ValueError(f"phoneme ids must lie in [0, {n}); got values in [{int(ids.min())}, {int(ids.max())}]"
                             " (was the model trained with a different symbol table?)")
        device = next(self.parameters()).device
        ids = ids.long().to(device)
        if phoneme_lengths is None:
            lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=device)
        else:
            lengths = phoneme_lengths.long().to(device)
        if duration_scale <= 0:
            raise ValueError(f"duration_scale must be > 0, got {duration_scale}")
        hidden, frames = self.acoustic.infer(ids, lengths, duration_scale, duration_mode)
        wav = self.vocoder(hidden)
        samples = frames * self.hop
        wav = wav * sequence_mask(samples, wav.shape[-1]).unsqueeze(1).to(wav.dtype)
        return (wav, samples) if return_lengths else wav

    def remove_weight_norm(self) -> int:
        """Fold weight normalization into plain weights everywhere (outputs unchanged). Returns layers folded."""
        return remove_weight_norm(self)

    def strip_for_inference(self) -> BitTTS:
        """Make the export form: fold weight norm and drop the training-only alignment module and mel head.
        After this, `infer` works and `forward` (training) does not."""
        self.remove_weight_norm()
        self.acoustic.aligner = None
        self.mel_head = None
        return self


def random_segment_starts(lengths: Tensor, segment: int) -> Tensor:
    """(B,) start frames, uniform in [0, max(length - segment, 0)] (drawn from torch's global CPU RNG)."""
    span = (lengths.cpu() - segment).clamp_min(0) + 1
    return (torch.rand(lengths.shape[0]) * span).long().clamp_max(span - 1)


def slice_segments(x: Tensor, starts: Tensor, length: int) -> Tensor:
    """x (B, C, T) -> (B, C, length) windows x[b, :, starts[b]:starts[b]+length], zero-padded past the end."""
    if x.shape[-1] < int(starts.max()) + length:
        x = nn.functional.pad(x, (0, int(starts.max()) + length - x.shape[-1]))
    idx = starts.view(-1, 1) + torch.arange(length, device=x.device).view(1, -1)
    return torch.gather(x, 2, idx.unsqueeze(1).expand(-1, x.shape[1], -1))


def apply_quantization(model: BitTTS, qcfg: QuantizationConfig) -> BitTTS:
    """Apply a quantization preset with ternq (in place; returns the model).

    scope "acoustic": every Linear/Conv of `model.acoustic`; scope "all": also `model.vocoder` except the layers
    feeding its output directly (ternq's graph-position selector `output_layers("vocoder")`: HiFi-GAN's
    conv_post). `ALWAYS_FLOAT` and `qcfg.exclude` stay float.
    """
    if qcfg.scheme == "none":
        return model
    import ternq

    common = {"granularity": qcfg.granularity, "act_bits": qcfg.act_bits or None,
              "input_norm": None if qcfg.input_norm == "none" else qcfg.input_norm}
    config = (ternq.TernaryConfig(**common) if qcfg.scheme == "ternary"
              else ternq.KBitConfig(bits=qcfg.bits, **common))
    include: list[Any] = ["acoustic.*"]
    exclude: list[Any] = [*ALWAYS_FLOAT, *qcfg.exclude]
    if qcfg.scope == "all":
        include.append("vocoder.*")
        exclude.append(ternq.output_layers("vocoder"))
    return ternq.quantize(model, include=include, exclude=exclude, config=config)


def build_model(cfg: BitTTSConfig) -> BitTTS:
    """Construct BitTTS for `cfg` and apply `cfg.quant`. Deterministic given torch's RNG state."""
    return apply_quantization(BitTTS(cfg), cfg.quant)


def parameter_counts(model: BitTTS, discriminators: nn.Module | None = None) -> dict[str, int]:
    """Parameter counts per part: the inference model (acoustic without the aligner + vocoder), the aligner,
    the training-only mel head if there is one, and the discriminators if given. Weight-norm models count g and
    v, as trained."""
    def count(m: nn.Module | None) -> int:
        return 0 if m is None else sum(p.numel() for p in m.parameters())
    aligner = count(model.acoustic.aligner)
    counts = {
        "acoustic": count(model.acoustic) - aligner,
        "aligner": aligner,
        "vocoder": count(model.vocoder),
    }
    counts["inference_total"] = counts["acoustic"] + counts["vocoder"]
    if model.mel_head is not None:
        counts["mel_head"] = count(model.mel_head)
    if discriminators is not None:
        counts["discriminators"] = count(discriminators)
    return counts


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (`RUN_DIR/checkpoint.pt`) and check its format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `bittts train --out RUN_DIR`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load of foreign bytes fails with UnpicklingError, IndexError, KeyError, ...
        raise ValueError(f"{path} is not a BitTTS training checkpoint (torch.load cannot read it: "
                         f"{type(e).__name__}); give a checkpoint.pt that `bittts train` wrote") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a BitTTS training checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: str | os.PathLike | dict[str, Any], map_location: str | torch.device = "cpu"
                          ) -> BitTTS:
    """Rebuild the (quantized, weight-normed) model of a checkpoint and load its weights; in eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location)
    model = build_model(config_from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval()
