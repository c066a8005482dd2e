"""HiFi-GAN discriminators: multi-period (MPD) and multi-scale (MSD). Training only.

They live in their own `Discriminators` module, never inside `BitTTS`, so an exported BitTTS never carries them.
Both take a batch of waveforms (B, 1, T) and return, per sub-discriminator, the final score map and the list of
intermediate feature maps (for the feature-matching loss).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from ..config import DiscriminatorConfig

__all__ = ["PeriodDiscriminator", "ScaleDiscriminator", "Discriminators"]

LRELU_SLOPE = 0.1


def _score(convs: nn.ModuleList, conv_post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Leaky-ReLU conv stack -> (flattened score map, every layer's output for feature matching)."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmaps.append(x)
    x = conv_post(x)
    fmaps.append(x)
    return x.flatten(1), fmaps


class PeriodDiscriminator(nn.Module):
    """Folds the waveform into (T / p, p) and runs 2-D convs along time: sees one sample phase at a time."""

    def __init__(self, period: int, channels: tuple[int, ...], kernel_size: int = 5, stride: int = 3) -> None:
        super().__init__()
        self.period = period
        layers = []
        prev = 1
        for i, c in enumerate(channels):
            s = stride if i < len(channels) - 1 else 1
            layers.append(weight_norm(nn.Conv2d(prev, c, (kernel_size, 1), (s, 1),
                                                padding=((kernel_size - 1) // 2, 0))))
            prev = c
        self.convs = nn.ModuleList(layers)
        self.conv_post = weight_norm(nn.Conv2d(prev, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            pad = self.period - t % self.period
            x = F.pad(x, (0, pad), "reflect" if pad < t else "constant")
            t = t + pad
        return _score(self.convs, self.conv_post, x.view(b, c, t // self.period, self.period))


class ScaleDiscriminator(nn.Module):
    """Strided grouped 1-D convs on the (possibly average-pooled) waveform."""

    def __init__(self, cfg: DiscriminatorConfig, use_spectral_norm: bool = False) -> None:
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        layers = []
        prev = 1
        for c, k, s, g in zip(cfg.msd_channels, cfg.msd_kernels, cfg.msd_strides, cfg.msd_groups):
            layers.append(norm(nn.Conv1d(prev, c, k, s, groups=g, padding=(k - 1) // 2)))
            prev = c
        self.convs = nn.ModuleList(layers)
        self.conv_post = norm(nn.Conv1d(prev, 1, 3, 1, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _score(self.convs, self.conv_post, x)


class Discriminators(nn.Module):
    """MPD (one PeriodDiscriminator per period) + MSD (`msd_scales` ScaleDiscriminators; the first uses spectral
    norm, each next one sees the waveform average-pooled by 2 more)."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.mpd = nn.ModuleList(PeriodDiscriminator(p, cfg.mpd_channels) for p in cfg.periods)
        self.msd = nn.ModuleList(ScaleDiscriminator(cfg, use_spectral_norm=(i == 0)) for i in range(cfg.msd_scales))
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, wav: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        """wav (B, 1, T) -> (scores per sub-discriminator, feature maps per sub-discriminator)."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"discriminators expect waveforms of shape (B, 1, T), got {tuple(wav.shape)}")
        scores, fmaps = [], []
        for d in self.mpd:
            s, f = d(wav)
            scores.append(s)
            fmaps.append(f)
        x = wav
        for i, d in enumerate(self.msd):
            if i > 0:
                x = self.pool(x)
            s, f = d(x)
            scores.append(s)
            fmaps.append(f)
        return scores, fmaps


def split_halves(outputs: tuple[list[Tensor], list[list[Tensor]]], n: int
                 ) -> tuple[tuple[list[Tensor], list[list[Tensor]]], tuple[list[Tensor], list[list[Tensor]]]]:
    """Split the output of one call on torch.cat([real, fake]) into (real outputs, fake outputs)."""
    scores, fmaps = outputs
    real = ([s[:n] for s in scores], [[f[:n] for f in fm] for fm in fmaps])
    fake = ([s[n:] for s in scores], [[f[n:] for f in fm] for fm in fmaps])
    return real, fake
