"""JETS acoustic model with the BitTTS paper's changes: text -> frame-rate hidden features for the vocoder.

    phonemes -> embedding -> conv encoder (4 x k5, 256 ch)
             -> variance adaptor: MDN duration predictor, pitch and energy predictors (+ embeddings)
             -> length regulator (durations from MAS in training, from the duration predictor at inference)
             -> conv decoder (4 x k5, 192 ch) -> hidden features (B, 192, T_mel)

The encoder and decoder use pre-norm residual conv blocks with RMSNorm and additive residuals: BitJETS-M4 found
those keep 1.58-bit training stable. As in JETS the decoder predicts no mel spectrogram: its output goes straight
to HiFi-GAN, and the alignment is learned jointly (alignment module + MAS, see `bittts.model.alignment`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AcousticConfig
from .alignment import (
    AlignmentModule,
    average_by_duration,
    beta_binomial_log_prior,
    binarization_loss,
    forward_sum_loss,
    length_regulate,
    maximum_path,
)

__all__ = ["RMSNorm", "ChannelLayerNorm", "ConvBlock", "ConvStack", "VariancePredictor", "MDNDurationPredictor",
           "AcousticModel", "sequence_mask"]


def sequence_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """(B, T) bool, True for positions < length."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class RMSNorm(nn.Module):
    """RMSNorm over the channel axis of (B, C, T) features: x / rms(x) * g (no mean subtraction, no bias)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight.view(1, -1, 1)


class ChannelLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the channel axis of (B, C, T) features."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def make_norm(kind: str, channels: int) -> nn.Module:
    return RMSNorm(channels) if kind == "rmsnorm" else ChannelLayerNorm(channels)


class ConvBlock(nn.Module):
    """Pre-norm residual block: x + dropout(relu(conv(norm(x)))), masked."""

    def __init__(self, channels: int, kernel_size: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.norm = make_norm(norm, channels)
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return (x + self.dropout(F.relu(self.conv(self.norm(x))))) * mask


class ConvStack(nn.Module):
    """`layers` ConvBlocks and a final norm: the encoder and the decoder."""

    def __init__(self, channels: int, layers: int, kernel_size: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(channels, kernel_size, dropout, norm) for _ in range(layers))
        self.norm = make_norm(norm, channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, C, T), mask (B, 1, T) float."""
        x = x * mask
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) * mask


class ScaledPositionalEncoding(nn.Module):
    """Sinusoidal positions times a learned scale (ESPnet's ScaledPositionalEncoding). Conv stacks see only a
    local window, so this tells the decoder where it is inside long runs of repeated phoneme vectors."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[-1]
        pos = torch.arange(t, device=x.device, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.channels, 2, device=x.device, dtype=torch.float32)
                        * (-math.log(10000.0) / self.channels))
        pe = torch.zeros(t, self.channels, device=x.device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : self.channels // 2]
        return x + self.alpha * pe.t().unsqueeze(0).to(x.dtype)


class VariancePredictor(nn.Module):
    """FastSpeech 2 predictor: (conv -> relu -> norm -> dropout) x layers, then a 1x1 conv to `out_channels`."""

    def __init__(self, in_channels: int, channels: int, layers: int, kernel_size: int, dropout: float,
                 norm: str, out_channels: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(in_channels if i == 0 else channels, channels, kernel_size, padding=kernel_size // 2)
            for i in range(layers))
        self.norms = nn.ModuleList(make_norm(norm, channels) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, C, T), mask (B, 1, T) -> (B, out_channels, T)."""
        for conv, norm in zip(self.convs, self.norms):
            x = self.dropout(norm(F.relu(conv(x * mask))))
        return self.proj(x * mask) * mask


class MDNDurationPredictor(nn.Module):
    """Mixture density network over log-duration: per token, K Gaussians (weight, mean, log-scale).

    Trained by negative log-likelihood of log(MAS duration). At inference, `predict` returns either the mixture
    mean sum_k pi_k mu_k ("mean", default: smooth, never picks an outlier component) or the mean of the most
    probable component ("mode", an approximation of the mixture's mode that follows the dominant component).
    """

    LOG_SCALE_MIN = -4.0

    def __init__(self, cfg: AcousticConfig) -> None:
        super().__init__()
        self.k = cfg.mdn_components
        self.net = VariancePredictor(cfg.enc_channels, cfg.variance_channels, cfg.variance_layers,
                                     cfg.variance_kernel, cfg.variance_dropout, cfg.norm, 3 * self.k)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (log weights, means, log scales), each (B, K, T_text)."""
        logits, means, log_scales = self.net(x, mask).chunk(3, dim=1)
        return F.log_softmax(logits, dim=1), means, log_scales.clamp_min(self.LOG_SCALE_MIN)

    @staticmethod
    def nll(params: tuple[Tensor, Tensor, Tensor], log_durations: Tensor, token_mask: Tensor) -> Tensor:
        """Mean NLL of (B, T_text) log-durations over valid tokens of each item, then over items."""
        log_w, means, log_scales = params
        z = (log_durations.unsqueeze(1) - means) * torch.exp(-log_scales)
        log_comp = -0.5 * z.pow(2) - log_scales - 0.5 * math.log(2 * math.pi)
        nll = -torch.logsumexp(log_w + log_comp, dim=1)  # (B, T_text)
        m = token_mask.to(nll.dtype)
        return ((nll * m).sum(1) / m.sum(1).clamp_min(1)).mean()

    @staticmethod
    def predict(params: tuple[Tensor, Tensor, Tensor], mode: str = "mean") -> Tensor:
        """(B, T_text) predicted log-duration."""
        log_w, means, _ = params
        if mode == "mean":
            return (log_w.exp() * means).sum(1)
        if mode == "mode":
            return means.gather(1, log_w.argmax(1, keepdim=True)).squeeze(1)
        raise ValueError(f"duration mode {mode!r}: expected 'mean' or 'mode'")


class AcousticModel(nn.Module):
    """JETS acoustic model (see module docstring). `forward` for training, `infer` for synthesis."""

    def __init__(self, cfg: AcousticConfig) -> None:
        super().__init__()
        if cfg.n_symbols < 2:
            raise ValueError(f"acoustic.n_symbols={cfg.n_symbols}: set it to the size of the phoneme symbol table "
                             "(the trainer takes it from the corpus' meta.json)")
        self.cfg = cfg
        c = cfg.enc_channels
        self.embed = nn.Embedding(cfg.n_symbols, c, padding_idx=0)
        nn.init.normal_(self.embed.weight, 0.0, 1.0)  # same scale as the positional encoding
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.enc_pos = ScaledPositionalEncoding(c)
        self.encoder = ConvStack(c, cfg.enc_layers, cfg.enc_kernel, cfg.dropout, cfg.norm)
        self.duration_predictor = MDNDurationPredictor(cfg)
        vp = (cfg.variance_channels, cfg.variance_layers, cfg.variance_kernel, cfg.variance_dropout, cfg.norm)
        self.pitch_predictor = VariancePredictor(c, *vp)
        self.energy_predictor = VariancePredictor(c, *vp)
        self.pitch_embed = nn.Conv1d(1, c, 1)
        self.energy_embed = nn.Conv1d(1, c, 1)
        self.aligner = AlignmentModule(c, cfg.n_mels, cfg.aligner_channels)
        self.dec_in = nn.Conv1d(c, cfg.dec_channels, 1)
        self.dec_pos = ScaledPositionalEncoding(cfg.dec_channels)
        self.decoder = ConvStack(cfg.dec_channels, cfg.dec_layers, cfg.dec_kernel, cfg.dropout, cfg.norm)

    def encode(self, phonemes: Tensor, phoneme_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """-> encoder output (B, C, T_text) and its mask (B, 1, T_text)."""
        mask = sequence_mask(phoneme_lengths, phonemes.shape[1]).unsqueeze(1).to(self.embed.weight.dtype)
        x = self.enc_pos(self.embed(phonemes).transpose(1, 2))
        return self.encoder(x, mask), mask

    def decode(self, h: Tensor, durations: Tensor, max_frames: int | None = None) -> tuple[Tensor, Tensor]:
        """Length-regulate token features by durations and decode -> (B, dec_channels, T), frame lengths."""
        frames, lengths = length_regulate(h, durations, max_frames)
        mask = sequence_mask(lengths, frames.shape[2]).unsqueeze(1).to(frames.dtype)
        x = self.dec_pos(self.dec_in(frames)) * mask
        return self.decoder(x, mask), lengths

    def forward(self, phonemes: Tensor, phoneme_lengths: Tensor, mel: Tensor, mel_lengths: Tensor,
                pitch: Tensor, energy: Tensor) -> dict[str, Tensor]:
        """Teacher-forced training pass (durations from MAS, ground-truth token pitch/energy).

        Args: phonemes (B, T_text) ids, phoneme_lengths (B,), mel (B, n_mels, T_mel), mel_lengths (B,),
            pitch and energy (B, T_mel) normalized frame values.

        Returns a dict: "hidden" (B, dec_channels, T_mel), "log_p_attn" (B, T_mel, T_text), "durations"
        (B, T_text) from MAS, "dur_params" (MDN log weights, means, log scales), "pitch_pred"/"pitch_target",
        "energy_pred"/"energy_target" (B, T_text), "text_mask" (B, T_text) bool, and the alignment and
        variance losses: "loss_forward_sum", "loss_bin", "loss_dur", "loss_pitch", "loss_energy".
        """
        h, mask = self.encode(phonemes, phoneme_lengths)
        text_mask = mask.squeeze(1).bool()
        log_p_attn = self.align(h, text_mask, phoneme_lengths, mel, mel_lengths)
        with torch.no_grad():
            durations = maximum_path(log_p_attn, phoneme_lengths, mel_lengths).to(h.device)
        frame_mask = sequence_mask(mel_lengths, mel.shape[2]).to(pitch.dtype)
        pitch_target = average_by_duration(pitch * frame_mask, durations) * mask.squeeze(1)
        energy_target = average_by_duration(energy * frame_mask, durations) * mask.squeeze(1)
        # predictors read a detached encoder output (JETS' stop-gradient) so their losses do not pull the encoder
        dur_params = self.duration_predictor(h.detach(), mask)
        pitch_pred = self.pitch_predictor(h.detach(), mask).squeeze(1)
        energy_pred = self.energy_predictor(h.detach(), mask).squeeze(1)
        h = h + self.pitch_embed(pitch_target.unsqueeze(1)) + self.energy_embed(energy_target.unsqueeze(1))
        hidden, _ = self.decode(h * mask, durations, mel.shape[2])
        log_dur = torch.log(durations.clamp_min(1).to(h.dtype))
        return {
            "hidden": hidden,
            "log_p_attn": log_p_attn,
            "durations": durations,
            "dur_params": dur_params,
            "pitch_pred": pitch_pred,
            "pitch_target": pitch_target,
            "energy_pred": energy_pred,
            "energy_target": energy_target,
            "text_mask": text_mask,
            "loss_forward_sum": forward_sum_loss(log_p_attn, phoneme_lengths, mel_lengths),
            "loss_bin": binarization_loss(log_p_attn, durations, mel_lengths),
            "loss_dur": MDNDurationPredictor.nll(dur_params, log_dur, text_mask),
            "loss_pitch": _masked_mse(pitch_pred, pitch_target, text_mask),
            "loss_energy": _masked_mse(energy_pred, energy_target, text_mask),
        }

    def align(self, h: Tensor, text_mask: Tensor, phoneme_lengths: Tensor, mel: Tensor, mel_lengths: Tensor
              ) -> Tensor:
        """Soft alignment log-probabilities (B, T_mel, T_text) of encoder output `h` against the target mel, with
        the beta-binomial diagonal prior when `cfg.align_prior` > 0."""
        prior = None
        if self.cfg.align_prior > 0:
            prior = beta_binomial_log_prior(phoneme_lengths, mel_lengths, h.shape[2], mel.shape[2],
                                            self.cfg.align_prior).to(h.dtype)
        return self.aligner(h, mel, text_mask, prior)

    def predict_durations(self, h: Tensor, mask: Tensor, duration_scale: float = 1.0,
                          duration_mode: str = "mean") -> Tensor:
        """Integer frames per token (>= 1 for real tokens, 0 for padding), capped at cfg.max_duration."""
        log_d = MDNDurationPredictor.predict(self.duration_predictor(h, mask), duration_mode)
        d = torch.round(torch.exp(log_d) * duration_scale).clamp(1, self.cfg.max_duration)
        return d.long() * mask.squeeze(1).long()

    def infer(self, phonemes: Tensor, phoneme_lengths: Tensor, duration_scale: float = 1.0,
              duration_mode: str = "mean", durations: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Synthesis pass: predicted durations, pitch and energy (no teacher forcing).

        Returns hidden features (B, dec_channels, T_frames) and frame lengths (B,). `durations` (B, T_text)
        overrides the duration predictor (e.g. for analysis).
        """
        h, mask = self.encode(phonemes, phoneme_lengths)
        if durations is None:
            durations = self.predict_durations(h, mask, duration_scale, duration_mode)
        pitch = self.pitch_predictor(h, mask)
        energy = self.energy_predictor(h, mask)
        h = (h + self.pitch_embed(pitch) + self.energy_embed(energy)) * mask
        return self.decode(h, durations)


def _masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-item mean squared error over valid tokens, then mean over items."""
    m = mask.to(pred.dtype)
    return (((pred - target) ** 2 * m).sum(1) / m.sum(1).clamp_min(1)).mean()
