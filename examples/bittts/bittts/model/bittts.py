"""BitTTS = JETS acoustic model + HiFi-GAN generator, trained end to end; quantization presets via ternq.

`BitTTS` is a plain nn.Module with two submodules, `acoustic` and `vocoder`:

- `forward(batch)` (training): teacher-forced acoustic pass, then the vocoder on a random segment of the decoder
  output; returns the generated segment, the matching real waveform segment and the acoustic model's losses.
- `infer(phoneme_ids)` (synthesis): durations from the MDN duration predictor, predicted pitch and energy,
  the whole utterance through the vocoder.

The GAN discriminators are a separate object (`bittts.model.discriminators.Discriminators`), so exporting BitTTS never
includes them. `build_model(cfg)` builds the model to train and applies `cfg.quant` (`bittts.model.quantization`);
`BitTTS.for_inference(cfg)` builds the form that is exported and loaded for synthesis. Checkpoint files are
`bittts.training.checkpoints`' business.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

import ternq

from ..config import BitTTSConfig
from ..limits import LimitError
from .acoustic import AcousticModel, sequence_mask
from .quantization import apply_quantization
from .vocoder import HiFiGANGenerator, remove_weight_norm

__all__ = ["BitTTS", "build_model", "parameter_counts", "TRAINING_ONLY"]

# state_dict prefixes of the training-only parts, which the export form does not have
TRAINING_ONLY = ("acoustic.aligner.", "mel_head.")


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
        """Training pass on a collated batch (see `bittts.data.dataset.collate`).

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
              duration_mode: str = "mean", return_lengths: bool = False,
              max_frames: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Synthesize waveforms from phoneme ids (call `model.eval()` first).

        Args:
            phoneme_ids: (T_text,) or (B, T_text) int ids, 0 = padding.
            phoneme_lengths: (B,) valid lengths; default all T_text.
            duration_scale: multiply predicted durations (>1 = slower speech).
            duration_mode: "mean" (mixture mean of log-duration, default) or "mode" (mean of the most probable
                MDN component); see `MDNDurationPredictor.predict`.
            return_lengths: also return the valid samples per item.
            max_frames: refuse (`bittts.limits.LimitError`) an item whose predicted durations sum to more frames,
                before the vocoder runs (its time and memory grow with the frames).

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
        if max_frames is not None and int(frames.max()) > max_frames:
            raise LimitError(f"{int(frames.max()):,} frames of audio, more than the {max_frames:,} asked for")
        wav = self.vocoder(hidden)
        samples = frames * self.hop
        wav = wav * sequence_mask(samples, wav.shape[-1]).unsqueeze(1).to(wav.dtype)
        return (wav, samples) if return_lengths else wav

    def remove_weight_norm(self) -> int:
        """Fold weight normalization into plain weights everywhere (outputs unchanged). Returns layers folded."""
        return remove_weight_norm(self)

    @classmethod
    def for_inference(cls, cfg: BitTTSConfig, *, quantize: bool = True,
                      device: torch.device | str | None = None) -> BitTTS:
        """The export form of `cfg`'s model: plain convs (weight norm absent: folding it gives the same
        tensors), no aligner, no mel head; `infer` works, `forward` (training) does not. The one definition of
        what `bittts export` writes, `Synthesizer` loads and `bittts.evaluation.sizes` measures.

        quantize: apply `cfg.quant` (as trained). False gives the float skeleton that `ternq.load_packed`
            turns into the packed model; on device "meta" it allocates no weights.
        """
        plain = dataclasses.replace(cfg, vocoder=dataclasses.replace(cfg.vocoder, weight_norm=False))
        if device is not None and torch.device(device).type == "meta":
            context = ternq.skeleton()  # meta without the initializations (they import torch._dynamo there)
        else:
            context = torch.device(device) if device is not None else contextlib.nullcontext()
        with context:
            model = cls(plain)
        if quantize:  # before the aligner goes: `ALWAYS_FLOAT` names it
            apply_quantization(model, cfg.quant)
        model.acoustic.aligner = None
        model.mel_head = None
        model.cfg = cfg
        return model


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


def build_model(cfg: BitTTSConfig) -> BitTTS:
    """BitTTS to train (or resume) for `cfg`, quantized as `cfg.quant` says. Deterministic given torch's RNG
    state."""
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
