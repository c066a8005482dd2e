"""JETS training losses: GAN (least squares), feature matching, mel L1, and the acoustic model's variance and
alignment losses (computed inside `AcousticModel.forward`, weighted here).

Every loss is a mean over batch items of per-item values (or over equal-size elements), so the loss of a batch
equals the mean of the losses of its shards: data-parallel training computes the same gradient as one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LossConfig
from ..data import audio

__all__ = ["mel_spectrogram", "mel_loss", "stft_loss", "STFT_RESOLUTIONS", "discriminator_loss",
           "generator_adversarial_loss", "feature_matching_loss", "generator_loss", "bin_loss_weight", "adversarial_active"]


def mel_spectrogram(wav: Tensor) -> Tensor:
    """(B, 1, L) waveform -> (B, n_mels, L // hop) natural-log mel, the same transform as the corpus features."""
    return audio.log_mel(wav.squeeze(1))


def mel_loss(wav_hat: Tensor, wav: Tensor) -> Tensor:
    """L1 between log-mel spectrograms of generated and real waveforms (HiFi-GAN's reconstruction loss)."""
    return F.l1_loss(mel_spectrogram(wav_hat), mel_spectrogram(wav))


# (n_fft, hop, window) of Parallel WaveGAN's multi-resolution STFT loss (Yamamoto et al. 2020, table 1)
STFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))


def stft_loss(wav_hat: Tensor, wav: Tensor, resolutions: tuple[tuple[int, int, int], ...] = STFT_RESOLUTIONS
              ) -> Tensor:
    """Multi-resolution STFT loss (Parallel WaveGAN): spectral convergence + L1 of log linear magnitudes, averaged
    over three FFT sizes. Why: a mel L1 alone never sees the fine harmonic structure above the mel resolution nor
    the frame-level smear of short windows, and a vocoder trained on it without discriminators buzzes; the linear
    spectra at three time-frequency trade-offs give that structure a gradient at a fraction of a GAN's cost."""
    x_hat, x = wav_hat.squeeze(1).to(wav.dtype), wav.squeeze(1)
    longest = max(n_fft for n_fft, _, _ in resolutions)
    if x.shape[-1] <= longest // 2:  # torch.stft's reflect padding needs more than n_fft / 2 samples
        raise ValueError(f"loss.lambda_stft: the vocoder segment has {x.shape[-1]} samples, the STFT loss needs more "
                         f"than {longest // 2}; raise train.segment_frames or set loss.lambda_stft=0")
    total = x.new_zeros(())
    for n_fft, hop, win in resolutions:
        window = torch.hann_window(win, device=x.device, dtype=x.dtype)
        m_hat, m = (_magnitude(torch.stft(signal, n_fft, hop, win, window, return_complex=True))
                    for signal in (x_hat, x))
        # per item, then the mean over items (the module docstring's batch/shard rule)
        convergence = torch.linalg.norm(m - m_hat, dim=(1, 2)) / torch.linalg.norm(m, dim=(1, 2)).clamp_min(1e-7)
        total = total + convergence.mean() + F.l1_loss(torch.log(m_hat), torch.log(m))
    return total / len(resolutions)


def _magnitude(spec: Tensor) -> Tensor:
    return torch.sqrt((spec.real**2 + spec.imag**2).clamp_min(1e-7))  # |z| of 0 has no gradient


def discriminator_loss(real_scores: list[Tensor], fake_scores: list[Tensor]) -> Tensor:
    """LSGAN: sum over sub-discriminators of mean (1 - D(real))^2 + mean D(fake)^2."""
    loss = real_scores[0].new_zeros(())
    for r, g in zip(real_scores, fake_scores):
        loss = loss + torch.mean((1 - r) ** 2) + torch.mean(g**2)
    return loss


def generator_adversarial_loss(fake_scores: list[Tensor]) -> Tensor:
    """LSGAN: sum over sub-discriminators of mean (1 - D(fake))^2."""
    loss = fake_scores[0].new_zeros(())
    for g in fake_scores:
        loss = loss + torch.mean((1 - g) ** 2)
    return loss


def feature_matching_loss(real_fmaps: list[list[Tensor]], fake_fmaps: list[list[Tensor]]) -> Tensor:
    """Sum over sub-discriminators and layers of mean |D_l(real) - D_l(fake)| (real features are constants)."""
    loss = real_fmaps[0][0].new_zeros(())
    for rs, gs in zip(real_fmaps, fake_fmaps):
        for r, g in zip(rs, gs):
            loss = loss + torch.mean(torch.abs(r.detach() - g))
    return loss


def bin_loss_weight(cfg: LossConfig, step: int) -> float:
    """Schedule of the binarization loss: 0 before cfg.bin_loss_start, then a linear ramp to 1."""
    if step < cfg.bin_loss_start:
        return 0.0
    return min(1.0, (step - cfg.bin_loss_start + 1) / max(cfg.bin_loss_ramp, 1))


def adversarial_active(cfg: LossConfig, step: int | None) -> bool:
    """Whether the discriminators take part at optimizer step `step` (None: always): after `cfg.adv_start`."""
    return step is None or step >= cfg.adv_start


def generator_loss(out: dict[str, Tensor], fake_scores: list[Tensor] | None, real_fmaps: list[list[Tensor]] | None,
                   fake_fmaps: list[list[Tensor]] | None, cfg: LossConfig, step: int | None = None
                   ) -> tuple[Tensor, dict[str, float]]:
    """Weighted JETS generator objective at optimizer step `step` (None: binarization loss fully on).

    `out` is `BitTTS.forward`'s output (holds the waveform segments and the acoustic losses). Before the
    discriminators join (`adversarial_active` is False) pass None for the scores and feature maps: the
    adversarial and feature-matching terms are then 0. "mel_aux" counts when `out` has "loss_mel_aux".
    Returns the total loss and the unweighted parts as floats (for logging).
    """
    zero = out["wav_hat"].new_zeros(())
    parts = {
        "mel": mel_loss(out["wav_hat"], out["wav"]),
        "stft": stft_loss(out["wav_hat"], out["wav"]) if cfg.lambda_stft > 0 else zero,
        "adv": zero if fake_scores is None else generator_adversarial_loss(fake_scores),
        "fm": zero if fake_fmaps is None or real_fmaps is None else feature_matching_loss(real_fmaps, fake_fmaps),
        "dur": out["loss_dur"],
        "pitch": out["loss_pitch"],
        "energy": out["loss_energy"],
        "forward_sum": out["loss_forward_sum"],
        "bin": out["loss_bin"],
    }
    total = (cfg.lambda_mel * parts["mel"] + cfg.lambda_stft * parts["stft"]
             + cfg.lambda_adv * parts["adv"] + cfg.lambda_fm * parts["fm"]
             + cfg.lambda_dur * parts["dur"] + cfg.lambda_pitch * parts["pitch"]
             + cfg.lambda_energy * parts["energy"]
             + cfg.lambda_align * parts["forward_sum"]
             + cfg.lambda_align * (1.0 if step is None else bin_loss_weight(cfg, step)) * parts["bin"])
    if "loss_mel_aux" in out:
        parts["mel_aux"] = out["loss_mel_aux"]
        total = total + cfg.lambda_mel_aux * parts["mel_aux"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
