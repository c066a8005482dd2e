"""HiFi-GAN generator (Kong et al. 2020, "resblock 1"), reading the acoustic decoder's hidden features.

Same layout as the original repository: conv_pre -> [leaky relu -> transposed-conv upsampling -> mean of
multi-receptive-field residual blocks] x len(upsample_rates) -> leaky relu -> conv_post -> tanh. All convs use
weight normalization (torch.nn.utils.parametrizations.weight_norm); `remove_weight_norm` folds it for export.
The last conv keeps the name `conv_post`: the `all` preset leaves exactly that layer in float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from ternq.runtime import leaky_relu_then
from ternq.weight_attr import latent as ternq_latent

from ..config import VocoderConfig

__all__ = ["ResBlock", "HiFiGANGenerator", "remove_weight_norm"]

LRELU_SLOPE = 0.1


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _init(module: nn.Module) -> nn.Module:
    """HiFi-GAN's init: N(0, 0.01) conv weights (before weight norm, which keeps the direction)."""
    module.weight.data.normal_(0.0, 0.01)
    return module


class ResBlock(nn.Module):
    """HiFi-GAN resblock 1: for each dilation, x += conv_d1(lrelu(conv_dil(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_init(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                                    padding=_padding(kernel_size, d))) for d in dilations)
        self.convs2 = nn.ModuleList(_init(nn.Conv1d(channels, channels, kernel_size,
                                                    padding=_padding(kernel_size))) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            # leaky_relu_then: c(F.leaky_relu(x)), the activation fused into a packed conv's input quantization
            x = x + leaky_relu_then(c2, leaky_relu_then(c1, x, LRELU_SLOPE), LRELU_SLOPE)
        return x


class HiFiGANGenerator(nn.Module):
    """Waveform from (B, in_channels, T) features: (B, 1, T * hop) in [-1, 1]."""

    def __init__(self, cfg: VocoderConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.initial_channels
        self.num_kernels = len(cfg.resblock_kernels)
        self.conv_pre = nn.Conv1d(in_channels, c0, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernels)):
            cin, cout = c0 // 2**i, c0 // 2 ** (i + 1)
            self.ups.append(_init(nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2)))
            self.resblocks.extend(ResBlock(cout, rk, rd)
                                  for rk, rd in zip(cfg.resblock_kernels, cfg.resblock_dilations))
        self.conv_post = _init(nn.Conv1d(c0 // 2 ** len(cfg.upsample_rates), 1, 7, padding=3))
        if cfg.weight_norm:
            for m in self.modules():
                if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                    weight_norm(m)

    @property
    def hop(self) -> int:
        return self.cfg.hop

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = leaky_relu_then(up, x, LRELU_SLOPE)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as in the original
        return x.tanh()

    def remove_weight_norm(self) -> None:
        """Fold weight normalization into plain weights (same outputs, fewer parameters to store)."""
        remove_weight_norm(self)


def remove_weight_norm(module: nn.Module) -> int:
    """Fold every `weight` parametrization (weight_norm) below `module` into a plain `weight` parameter.

    Works on float layers and on ternq QAT layers alike; a QAT layer stays a QAT layer. (torch's
    `remove_parametrizations` cannot do the latter: it deletes the property from the module's class, which for
    a QAT layer is a subclass that only inherits it.) Returns how many layers were folded.
    """
    count = 0
    for m in list(module.modules()):
        if not parametrize.is_parametrized(m, "weight"):
            continue
        if len(m.parametrizations) > 1:  # other tensors parametrized too: torch's general path
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        else:
            with torch.no_grad():  # the float weight: a QAT layer's `weight` reads as its quantized value
                weight = ternq_latent(m, "weight").detach().clone()
            requires_grad = any(p.requires_grad for p in m.parametrizations.weight.parameters())
            base = type(m).__bases__[0]  # ParametrizedConv1d -> Conv1d; QuantConv1dParametrized -> QuantConv1d
            if isinstance(getattr(base, "weight", None), property):
                raise TypeError(f"cannot fold weight norm of {type(m).__name__}: {base.__name__} still "
                                "parametrizes `weight`")
            del m._modules["parametrizations"]
            m.__class__ = base
            m.register_parameter("weight", nn.Parameter(weight, requires_grad=requires_grad))
        count += 1
    return count
