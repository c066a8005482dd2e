"""Learned text-to-speech alignment, as in JETS: an alignment module gives a soft alignment, monotonic alignment
search (MAS) turns it into hard durations, and two losses (forward-sum, binarization) train it jointly with the
rest of the model. Also the length regulator that expands phoneme features by durations.

All tensors use the layout (batch, mel frames, text) for alignments and (batch, channels, time) for features.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AlignmentModule",
    "beta_binomial_log_prior",
    "maximum_path",
    "durations_to_attention",
    "length_regulate",
    "average_by_duration",
    "forward_sum_loss",
    "binarization_loss",
]


class AlignmentModule(nn.Module):
    """Soft alignment log p(text token | mel frame) from distances between projected text and mel features.

    JETS' module: two convs on the text side, three on the mel side, score = -L2 distance, log-softmax over
    the text axis. Used only in training: inference reads durations from the duration predictor.
    """

    def __init__(self, text_channels: int, mel_channels: int, channels: int) -> None:
        super().__init__()
        self.t_conv1 = nn.Conv1d(text_channels, channels, 3, padding=1)
        self.t_conv2 = nn.Conv1d(channels, channels, 1)
        self.f_conv1 = nn.Conv1d(mel_channels, channels, 3, padding=1)
        self.f_conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.f_conv3 = nn.Conv1d(channels, channels, 1)

    def forward(self, text: Tensor, mel: Tensor, text_mask: Tensor, log_prior: Tensor | None = None) -> Tensor:
        """text (B, C_text, T_text), mel (B, n_mels, T_mel), text_mask (B, T_text) bool, True = valid,
        log_prior (B, T_mel, T_text) optional (see `beta_binomial_log_prior`).

        Returns log_p_attn (B, T_mel, T_text), normalized over text; padded text positions are -inf."""
        t = self.t_conv2(F.relu(self.t_conv1(text))).transpose(1, 2)  # (B, T_text, C)
        f = self.f_conv3(F.relu(self.f_conv2(F.relu(self.f_conv1(mel))))).transpose(1, 2)  # (B, T_mel, C)
        # squared distances through one matmul: (B, T_mel, T_text) without a (B, T_mel, T_text, C) tensor
        d2 = f.pow(2).sum(-1, keepdim=True) + t.pow(2).sum(-1).unsqueeze(1) - 2 * f @ t.transpose(1, 2)
        score = -torch.sqrt(d2.clamp_min(0) + 1e-6)
        score = score.masked_fill(~text_mask.unsqueeze(1), float("-inf"))
        log_p = F.log_softmax(score, dim=-1)
        if log_prior is not None:
            log_p = F.log_softmax(log_p + log_prior, dim=-1)
        return log_p


def beta_binomial_log_prior(text_lengths: Tensor, mel_lengths: Tensor, max_text: int, max_mel: int,
                            scaling: float = 1.0) -> Tensor:
    """Static alignment prior of Badlani et al. 2021 ("One TTS alignment to rule them all"): for mel frame t of
    M, the text position follows BetaBinomial(n = N - 1, a = s (t + 1), b = s (M - t)), a soft diagonal.

    Adding it to the soft alignment keeps the learned alignment from collapsing onto a few tokens early in
    training. Returns (B, max_mel, max_text) log-probabilities; 0 outside each item's lengths.
    """
    device = text_lengths.device
    k = torch.arange(max_text, device=device, dtype=torch.float64).view(1, 1, -1)
    t = torch.arange(max_mel, device=device, dtype=torch.float64).view(1, -1, 1)
    n = (text_lengths.to(torch.float64) - 1).view(-1, 1, 1)
    m = mel_lengths.to(torch.float64).view(-1, 1, 1)
    a = scaling * (t + 1)
    b = (scaling * (m - t)).clamp_min(scaling)  # frames past the end: any valid value, masked below
    kk = torch.minimum(k, n)
    lg = torch.lgamma
    log_pmf = (lg(n + 1) - lg(kk + 1) - lg(n - kk + 1) + lg(kk + a) + lg(n - kk + b) - lg(n + a + b)
               - lg(a) - lg(b) + lg(a + b))
    valid = (k <= n) & (t < m)
    return torch.where(valid, log_pmf, torch.zeros_like(log_pmf)).to(torch.float32)


def maximum_path(log_p: np.ndarray | Tensor, text_lengths: np.ndarray | Tensor,
                 mel_lengths: np.ndarray | Tensor) -> Tensor:
    """Monotonic alignment search: the most likely monotonic path through `log_p`, as durations.

    A path visits every text token in order, each for at least one frame, and covers every mel frame exactly
    once (Glow-TTS / JETS MAS). Dynamic program over mel frames, vectorized over batch and text:
    Q[t, j] = log_p[t, j] + max(Q[t-1, j], Q[t-1, j-1]); then backtrack from (T_mel-1, T_text-1).

    Args:
        log_p: (B, T_mel, T_text) log-probabilities (any finite or -inf values).
        text_lengths, mel_lengths: (B,) valid lengths; needs text_length <= mel_length per item.

    Returns:
        durations (B, T_text) int64: frames per token, >= 1 for valid tokens, 0 for padding,
        summing to mel_lengths.
    """
    lp = (log_p.detach().float().cpu().numpy() if isinstance(log_p, Tensor) else np.asarray(log_p, np.float64))
    lp = lp.astype(np.float64)
    tl = np.asarray(text_lengths.cpu() if isinstance(text_lengths, Tensor) else text_lengths, dtype=np.int64)
    ml = np.asarray(mel_lengths.cpu() if isinstance(mel_lengths, Tensor) else mel_lengths, dtype=np.int64)
    if lp.ndim != 3:
        raise ValueError(f"maximum_path: log_p must be (batch, mel frames, text), got shape {lp.shape}")
    b, t_mel, t_text = lp.shape
    if tl.shape != (b,) or ml.shape != (b,):
        raise ValueError(f"maximum_path: lengths must have shape ({b},), got {tl.shape} and {ml.shape}")
    if (tl < 1).any() or (tl > t_text).any() or (ml > t_mel).any():
        raise ValueError("maximum_path: lengths out of range for log_p's shape")
    bad = np.nonzero(ml < tl)[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"maximum_path: item {i} has {ml[i]} mel frames for {tl[i]} text tokens; every token "
                         "needs at least one frame (drop such utterances from the corpus)")
    neg = -np.inf
    lp = np.where(np.isnan(lp), neg, lp)
    lp = np.where(np.arange(t_text)[None, None, :] >= tl[:, None, None], neg, lp)
    q = np.full((b, t_mel, t_text), neg)
    q[:, 0, 0] = lp[:, 0, 0]
    for t in range(1, t_mel):
        prev = q[:, t - 1]
        shifted = np.concatenate([np.full((b, 1), neg), prev[:, :-1]], axis=1)
        q[:, t] = np.maximum(prev, shifted) + lp[:, t]
    # backtrack, vectorized over the batch; items start at their own last frame / last token
    idx = tl - 1
    path = np.zeros((b, t_mel), dtype=np.int64)
    rows = np.arange(b)
    for t in range(t_mel - 1, -1, -1):
        active = t < ml
        path[active, t] = idx[active]
        if t == 0:
            break
        stay = q[rows, t - 1, idx]
        move = np.where(idx > 0, q[rows, t - 1, np.maximum(idx - 1, 0)], neg)
        # must move when the remaining t frames cannot hold idx+1 tokens (also resolves all -inf ties)
        step = (idx > 0) & ((move > stay) | (idx > t - 1))
        idx = np.where(active, idx - step.astype(np.int64), idx)
    durations = np.zeros((b, t_text), dtype=np.int64)
    for i in range(b):
        durations[i, : tl[i]] = np.bincount(path[i, : ml[i]], minlength=int(tl[i]))[: tl[i]]
    return torch.from_numpy(durations)


def durations_to_attention(durations: Tensor, max_frames: int | None = None) -> Tensor:
    """Hard alignment (B, T_mel, T_text) float: frame t of item b attends to the token whose span covers t."""
    token = _frame_to_token(durations, max_frames)
    t_text = durations.shape[1]
    valid = token < t_text
    attn = F.one_hot(token.clamp(max=t_text - 1), t_text).to(torch.float32)
    return attn * valid.unsqueeze(-1)


def _frame_to_token(durations: Tensor, max_frames: int | None) -> Tensor:
    """(B, T_out) index of the token each output frame copies; T_text for frames past the item's end."""
    if durations.dim() != 2:
        raise ValueError(f"durations must be (batch, text), got shape {tuple(durations.shape)}")
    if not torch.compiler.is_exporting() and (durations < 0).any():  # a check on data torch.export cannot record
        raise ValueError("durations must be >= 0")
    cum = durations.long().cumsum(1)
    if max_frames is None:
        t_out = int(cum[:, -1].max()) if cum.numel() else 0
    else:
        t_out = int(max_frames)
    frames = torch.arange(t_out, device=durations.device).unsqueeze(0).expand(durations.shape[0], -1)
    return torch.searchsorted(cum.contiguous(), frames.contiguous(), right=True)


def length_regulate(x: Tensor, durations: Tensor, max_frames: int | None = None) -> tuple[Tensor, Tensor]:
    """Repeat token features by durations (FastSpeech's length regulator), padding with zeros.

    Args:
        x: (B, C, T_text) token features.
        durations: (B, T_text) non-negative integer frame counts (0 drops a token).
        max_frames: output length; default the longest item's total. Longer items are cut.

    Returns:
        (B, C, T_out) frame features and (B,) lengths = durations.sum(1) (capped at max_frames).
    """
    if x.dim() != 3 or durations.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"length_regulate: x {tuple(x.shape)} and durations {tuple(durations.shape)} disagree; "
                         "expected x (B, C, T_text) and durations (B, T_text)")
    token = _frame_to_token(durations, max_frames)  # (B, T_out)
    valid = token < x.shape[2]
    gathered = torch.gather(x, 2, token.clamp(max=x.shape[2] - 1).unsqueeze(1).expand(-1, x.shape[1], -1))
    lengths = durations.long().sum(1)
    if max_frames is not None:
        lengths = lengths.clamp(max=int(max_frames))
    return gathered * valid.unsqueeze(1).to(x.dtype), lengths


def average_by_duration(values: Tensor, durations: Tensor) -> Tensor:
    """Token-level mean of frame-level values (B, T_mel) over each token's frames -> (B, T_text); 0 for empty."""
    attn = durations_to_attention(durations, values.shape[1]).to(values.dtype)  # (B, T_mel, T_text)
    sums = torch.bmm(values.unsqueeze(1), attn).squeeze(1)
    return sums / durations.clamp_min(1).to(values.dtype)


def forward_sum_loss(log_p_attn: Tensor, text_lengths: Tensor, mel_lengths: Tensor, blank_logprob: float = -1.0
                     ) -> Tensor:
    """RAD-TTS / JETS forward-sum loss: CTC with the text tokens as the label sequence 1..N, so that the soft
    alignment puts mass on monotonic paths. Mean over items (each normalized by its text length)."""
    b, t_mel, t_text = log_p_attn.shape
    padded = F.pad(log_p_attn, (1, 0), value=blank_logprob)  # class 0 = blank
    keep = torch.arange(t_text + 1, device=log_p_attn.device).unsqueeze(0) <= text_lengths.unsqueeze(1)
    # a large finite value, not -inf: torch's CTC backward turns -inf log-probs of unused classes into NaN
    padded = padded.masked_fill(~keep.unsqueeze(1), -1e4)
    log_probs = F.log_softmax(padded, dim=-1).transpose(0, 1)  # (T_mel, B, T_text + 1)
    targets = torch.arange(1, t_text + 1, device=log_p_attn.device).unsqueeze(0).expand(b, -1)
    return F.ctc_loss(log_probs, targets, mel_lengths, text_lengths, blank=0, reduction="mean",
                      zero_infinity=True)


def binarization_loss(log_p_attn: Tensor, durations: Tensor, mel_lengths: Tensor) -> Tensor:
    """-mean log p of the hard (MAS) alignment under the soft one; pulls the soft alignment toward the hard one.
    Mean over each item's frames, then over items."""
    hard = durations_to_attention(durations, log_p_attn.shape[1]).to(log_p_attn.dtype)
    picked = (log_p_attn.masked_fill(hard == 0, 0.0) * hard).sum(-1)  # (B, T_mel): log p on the path
    frame_mask = torch.arange(log_p_attn.shape[1], device=log_p_attn.device).unsqueeze(0) < mel_lengths.unsqueeze(1)
    per_item = -(picked * frame_mask).sum(1) / mel_lengths.clamp_min(1).to(log_p_attn.dtype)
    return per_item.mean()
