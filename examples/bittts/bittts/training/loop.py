"""The BitTTS training loop: JETS joint training (acoustic model + HiFi-GAN) with optional ternq QAT.

One explicit loop, nanoGPT style. Per optimizer step, for each of `grad_accum` micro-batches:

    out = model(batch)                                   # teacher-forced acoustic pass + vocoder on a segment
    D loss on (real segment, generated segment detached)  -> backward into the discriminators
    G loss = 45 mel + adv + 2 fm + dur + pitch + energy + 2 (forward-sum + w(step) bin) [+ mel_aux + stft]
             -> backward
then both AdamW optimizers step (grads clipped) and both ExponentialLR schedulers advance. Both networks are
updated from the same discriminator state (simultaneous updates), which is what makes gradient accumulation
exact: every micro-batch sees the same networks. During a reconstruction-only warm-up (`step < loss.adv_start`)
the discriminators are not run at all: no D loss, no adversarial or feature-matching term.

`train` is `_set_up` (build a new run or restore a checkpointed one: config, data, model, warm start,
discriminators, optimizers, RNG states, aligner warm-up, DDP) followed by `_loop` (the steps, logging and
checkpoints).

Runs on one process or under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA; batch_size is per
process). Rank 0 writes `RUN_DIR/checkpoint.pt` (atomically), `config.toml`, `metrics.jsonl`, TensorBoard logs in
`RUN_DIR/tb/` and mel images in `RUN_DIR/images/`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ternq.atomic import atomic_write

from ..atomic import atomic_torch_save
from ..config import BitTTSConfig, config_diff, config_from_dict, config_to_dict, save_config
from ..extras import require
from ..model.bittts import TRAINING_ONLY, BitTTS, parameter_counts
from ..model.discriminators import Discriminators, split_halves
from ..model.losses import adversarial_active, discriminator_loss, generator_loss, mel_spectrogram
from ..model.quantization import apply_quantization
from .checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_NAME, load_checkpoint

__all__ = ["train", "mel_figure", "NonFiniteLossError", "TrainState", "resolve_device", "truncate_metrics"]

# train.* fields a resumed run may change: they decide what is logged and when, and how fast, not what is computed
BOOKKEEPING = ("steps", "log_every", "image_every", "ckpt_every", "num_workers", "max_nonfinite", "threads")
# config fields a resumed run may change on purpose, as a recorded recipe change: regularization that changes no
# parameter shape (e.g. switching the predictors' dropout off mid-run). Each change is logged and kept in the
# checkpoint's "recipe_changes" (and the exported model's metadata).
RECIPE_CHANGES = {"acoustic": ("dropout", "variance_dropout")}


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_nonfinite` consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainState:
    """Where training is: optimizer steps done and the position in the data order."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped: int = 0
    seconds: float = 0.0  # training wall time over every resumed segment, up to the last checkpoint


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's CUDA device when CUDA is available, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected 'auto', 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device; use --device auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables (1 process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


# ----------------------------------------------------------------------------------------------- data order


class _Batches:
    """Endless per-process batches in a deterministic order: epoch e shuffles with seed (seed, e); global batch k
    is permutation slice [k*B*W, (k+1)*B*W) and process r takes its r-th B items. Position lives in `state`, so
    a resumed run continues with the next batch; one process with batch B*W sees exactly the same items."""

    def __init__(self, dataset: Dataset, collate: Callable, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int, state: TrainState) -> None:
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.num_workers, self.state = num_workers, state
        n = len(dataset)  # type: ignore[arg-type]
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {n} utterances, fewer than one global batch "
                             f"(batch_size {batch_size} x {world} processes); lower train.batch_size "
                             "(e.g. --set train.batch_size=2) or prepare more data")

    def plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        gb, b, r = self.batch_size * self.world, self.batch_size, self.rank
        return [perm[k * gb + r * b: k * gb + (r + 1) * b] for k in range(self.per_epoch)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            plan = self.plan(self.state.epoch)[self.state.batch_in_epoch:]
            # own generator: creating a DataLoader iterator must not consume the global RNG (exact resume)
            loader = DataLoader(self.dataset, batch_sampler=plan, collate_fn=self.collate,
                                num_workers=self.num_workers, generator=torch.Generator())
            for batch in loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ rng state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------- checkpoints


def _gather_rng(world: int) -> list[dict[str, Any]]:
    state = _rng_state()
    if world == 1:
        return [state]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


# ------------------------------------------------------------------------------------------------- images


def mel_figure(panels: list[tuple[str, Tensor]], path: Path) -> np.ndarray:
    """Write a PNG with one mel spectrogram per row; returns the RGB image (for TensorBoard)."""
    require("publish", "drawing mel spectrograms")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.2 * len(panels)), dpi=80)
    canvas = FigureCanvasAgg(fig)
    for i, (title, mel) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        im = ax.imshow(mel.float().cpu().numpy(), origin="lower", aspect="auto", interpolation="none",
                       vmin=-11.5, vmax=2.0)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mel bin")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write(path, png.getvalue())
    return rgb


@torch.no_grad()
def _snapshot(model: BitTTS, batch: dict[str, Any], out: dict[str, Any], path: Path) -> np.ndarray:
    """Target vs generated mels: the training segment (teacher-forced durations) and the first utterance
    synthesized from its phonemes alone (predicted durations, pitch and energy)."""
    seg_real = mel_spectrogram(out["wav"][:1].detach())[0]
    seg_fake = mel_spectrogram(out["wav_hat"][:1].detach().float())[0]
    n_text, n_mel = int(batch["phoneme_lengths"][0]), int(batch["mel_lengths"][0])
    was_training = model.training
    model.eval()
    try:
        hidden, frames = model.acoustic.infer(batch["phonemes"][:1, :n_text], batch["phoneme_lengths"][:1])
        hidden = hidden[..., : max(2 * n_mel, 1)]  # an untrained duration predictor may ramble
        synth = mel_spectrogram(model.vocoder(hidden))[0]
    finally:
        model.train(was_training)
    return mel_figure([
        ("target: training segment", seg_real),
        ("generated: training segment (teacher-forced durations)", seg_fake),
        (f"target: {batch['ids'][0]}", batch["mel"][0, :, :n_mel]),
        (f"synthesized from phonemes: {batch['ids'][0]} ({int(frames[0])} frames)", synth),
    ], path)


# ------------------------------------------------------------------------------------------------ metrics


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of a metrics log (JSON objects with a "step") up to `step`, in increasing step order;
    drop the rest (steps logged after the checkpoint a run resumes from, a line cut by a kill). Atomic."""
    if not path.exists():
        return
    kept, last = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                entry = json.loads(raw)
            except ValueError:
                break  # a line cut by a kill: nothing after it is trustworthy
            n = entry.get("step") if isinstance(entry, dict) else None
            if type(n) is not int or not last < n <= step:
                break
            kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
            last = n
    atomic_write(path, b"".join(kept))


# ----------------------------------------------------------------------------------------------- the run


def train(cfg: BitTTSConfig, out_dir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
          dataset: Dataset | None = None, collate_fn: Callable | None = None, steps: int | None = None,
          resume: bool = False, device: str = "auto", progress: bool = True,
          log: Callable[[str], None] | None = None, init_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train BitTTS; returns {"step", "skipped", "history" (logged values per log step), "params", ...}.

    Args:
        cfg: model + training config (e.g. `load_preset("tiny")`). acoustic.n_symbols = 0 is taken from the
            corpus' symbol table.
        out_dir: run directory (checkpoint, config.toml, metrics.jsonl, tb/, images/).
        data_dir: prepared corpus (`bittts prepare`); or pass `dataset` (+ `collate_fn`) directly.
        steps: total optimizer steps to reach (default cfg.train.steps).
        resume: continue from `out_dir/checkpoint.pt` exactly (weights, optimizers, schedulers, data position,
            RNG states); `cfg` must match the checkpoint's config except the `BOOKKEEPING` train fields and the
            `RECIPE_CHANGES` fields (changed from the checkpoint's step on, and recorded).
        device: "auto" (CUDA if available), "cpu" or "cuda".
        log: where messages go (default: above the progress bar).
        init_from: start a new run from a float model's weights (an export or a checkpoint.pt; see
            `bittts.training.warmstart`); ignored when resuming a checkpoint.
    """
    require("train", "training (TensorBoard logs, mel spectrogram images)")
    from tqdm import tqdm

    rank, world, local_rank = _dist_env()
    own_group = world > 1 and not dist.is_initialized()
    dev = resolve_device(device, local_rank)
    if own_group:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    threads = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    try:
        proc = _Process(rank, world, dev, (log or tqdm.write) if rank == 0 else (lambda msg: None), progress)
        run, batches = _set_up(cfg, Path(out_dir), proc, data_dir=data_dir, dataset=dataset, collate_fn=collate_fn,
                               steps=steps, resume=resume, init_from=init_from)
        result = _loop(run, batches, Path(out_dir), proc)
        if own_group:
            dist.barrier()  # no process tears the group down while another still talks to it
        return result
    finally:
        torch.set_num_threads(threads)
        if own_group:
            dist.destroy_process_group()


@dataclasses.dataclass
class _Process:
    """This process's place in the run: rank and world size (torchrun), device, and how it reports."""

    rank: int
    world: int
    device: torch.device
    say: Callable[[str], None]  # a message for the user; silent on every rank but 0
    progress: bool  # progress bars (rank 0 only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class _Run:
    """What `_set_up` builds or restores and `_loop` trains: the networks, their optimizers and schedulers, where
    training is, and what else a checkpoint records."""

    cfg: BitTTSConfig
    model: BitTTS
    discriminators: Discriminators
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    symbols: list[str] | None
    recipe_changes: list[dict[str, Any]]
    init: dict[str, Any] | None  # the warm start's source, or None (the checkpoint's "init" record)
    gen: nn.Module | None = None  # model and discriminators as the step calls them: DDP wrappers under torchrun
    disc: nn.Module | None = None


# ---------------------------------------------------------------------------------------------- set-up


def _set_up(cfg: BitTTSConfig, out_dir: Path, proc: _Process, *, data_dir: str | os.PathLike | None,
            dataset: Dataset | None, collate_fn: Callable | None, steps: int | None, resume: bool,
            init_from: str | os.PathLike | None) -> tuple[_Run, Iterator[dict[str, Any]]]:
    """Build a new run or restore the checkpointed one: config, data, model (warm-started from `init_from`, then
    quantized) and discriminators, optimizers, RNG states; then a warm start's aligner warm-up and, under
    torchrun, the DDP wrappers. Returns the run and its endless batches."""
    cfg = config_from_dict(config_to_dict(cfg))  # private copy
    dataset, collate_fn, symbols = _training_data(cfg, data_dir, dataset, collate_fn)
    cfg.train.steps = int(steps if steps is not None else cfg.train.steps)
    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt = None
    recipe_changes: list[dict[str, Any]] = []
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        cfg, recipe_changes = _resumed_config(cfg, ckpt, out_dir, proc.say)
    elif resume:
        proc.say(f"no checkpoint in {out_dir}: starting from scratch")
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    init: dict[str, Any] | None = None
    if ckpt is None and init_from is not None:
        from .warmstart import read_init_weights
        init = read_init_weights(init_from)
    elif init_from is not None:
        proc.say(f"--init-from {init_from} ignored: resuming the checkpoint in {out_dir}")
    _seed_all(cfg.train.seed)  # identical initial weights in every process
    model = BitTTS(cfg)
    rebuilt: list[str] = []
    if init is not None:
        from .warmstart import load_init_weights
        rebuilt = load_init_weights(model, init, symbols)
        symbols = symbols or init["symbols"]
        parts = [p.rstrip(".") for p in TRAINING_ONLY if any(k.startswith(p) for k in rebuilt)]
        proc.say(f"initialized from {init['source']['file']} (step {init['source']['step']}); freshly "
                 f"initialized: {', '.join(parts) or 'nothing'}")
    model = apply_quantization(model, cfg.quant).to(proc.device)
    discriminators = Discriminators(cfg.discriminator).to(proc.device)
    t = cfg.train
    opt_g = torch.optim.AdamW(model.parameters(), t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay)
    opt_d = torch.optim.AdamW(discriminators.parameters(), t.lr, betas=t.betas, eps=t.adam_eps,
                              weight_decay=t.weight_decay)
    run = _Run(cfg, model, discriminators, opt_g, opt_d, torch.optim.lr_scheduler.ExponentialLR(opt_g, t.lr_decay),
               torch.optim.lr_scheduler.ExponentialLR(opt_d, t.lr_decay), TrainState(), symbols, recipe_changes,
               None if init is None else dict(init["source"]))
    _seed_all(cfg.train.seed + proc.rank)
    if ckpt is not None:
        _restore(run, ckpt, ckpt_path, proc)

    batches = iter(_Batches(dataset, collate_fn, t.batch_size, proc.rank, proc.world, t.seed, t.num_workers,
                            run.state))
    if init is not None and any(k.startswith("acoustic.aligner.") for k in rebuilt) and t.aligner_warmup:
        # before DDP wraps the model: DDP then broadcasts rank 0's warmed-up aligner to every process
        from .warmstart import warm_up_aligner
        losses = warm_up_aligner(model, batches, t.aligner_warmup, cfg, proc.device,
                                 progress=proc.is_main and proc.progress)
        run.init.update(aligner_warmup=t.aligner_warmup, aligner_loss=[round(losses[0], 4), round(losses[-1], 4)])
        proc.say(f"aligner warm-up: {t.aligner_warmup} steps, forward-sum loss {losses[0]:.3f} -> "
                 f"{losses[-1]:.3f}")
    run.gen, run.disc = model, discriminators
    if proc.world > 1:
        ids = [proc.device.index] if proc.device.type == "cuda" else None
        run.gen, run.disc = DDP(model, device_ids=ids), DDP(discriminators, device_ids=ids)
    return run, batches


def _training_data(cfg: BitTTSConfig, data_dir: str | os.PathLike | None, dataset: Dataset | None,
                   collate_fn: Callable | None) -> tuple[Dataset, Callable, list[str] | None]:
    """The training set, its collate function and the corpus' symbol table (None for a dataset passed in); a
    config with acoustic.n_symbols = 0 takes the table's size (`cfg` is changed in place)."""
    symbols = None
    if dataset is None:
        if data_dir is None:
            raise ValueError("train(): pass data_dir (a prepared corpus) or dataset")
        from ..data.dataset import TTSDataset, collate
        dataset, collate_fn = TTSDataset(data_dir, "train"), collate
        symbols = list(dataset.meta["symbols"])
        if cfg.acoustic.n_symbols == 0:
            cfg.acoustic.n_symbols = len(symbols)
        elif cfg.acoustic.n_symbols < len(symbols):
            raise ValueError(f"acoustic.n_symbols={cfg.acoustic.n_symbols} but the corpus has {len(symbols)} symbols")
    if collate_fn is None:
        from ..data.dataset import collate as collate_fn
    return dataset, collate_fn, symbols


def _resumed_config(cfg: BitTTSConfig, ckpt: dict[str, Any], out_dir: Path, say: Callable[[str], None]
                    ) -> tuple[BitTTSConfig, list[dict[str, Any]]]:
    """The config a resumed run continues with: the checkpoint's, with `cfg`'s `BOOKKEEPING` fields and its
    `RECIPE_CHANGES` (recorded with the step they start at); any other difference is an error. Returns it and
    the run's recipe changes so far."""
    saved = config_from_dict(ckpt["config"])
    for name in BOOKKEEPING:  # these may change between runs; everything else must match
        setattr(saved.train, name, getattr(cfg.train, name))
    changes = []
    for section, names in RECIPE_CHANGES.items():
        for name in names:
            old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
            if old != new:
                changes.append(f"{section}.{name}: {old!r} -> {new!r}")
                setattr(getattr(saved, section), name, new)
    diff = config_diff(saved, cfg)
    if diff:
        raise ValueError(f"--resume: the checkpoint in {out_dir} was trained with a different config "
                         f"(checkpoint vs now: {'; '.join(diff)}); resume with the same preset/overrides or use a "
                         "new --out")
    recipe_changes = list(ckpt.get("recipe_changes", []))
    if changes:
        step = int(ckpt["state"]["step"])
        recipe_changes.append({"step": step, "changes": changes})
        say(f"--resume: recipe change from step {step}: {'; '.join(changes)}")
    return saved, recipe_changes


def _restore(run: _Run, ckpt: dict[str, Any], path: Path, proc: _Process) -> None:
    """Load a checkpoint into a freshly built run: weights, optimizers, schedulers, position, RNG states."""
    run.model.load_state_dict(ckpt["model"])
    run.discriminators.load_state_dict(ckpt["discriminators"])
    run.opt_g.load_state_dict(ckpt["optim_g"])
    run.opt_d.load_state_dict(ckpt["optim_d"])
    run.sched_g.load_state_dict(ckpt["sched_g"])
    run.sched_d.load_state_dict(ckpt["sched_d"])
    run.state = TrainState(**ckpt["state"])
    if run.symbols is not None and ckpt.get("symbols") is not None and ckpt["symbols"] != run.symbols:
        raise ValueError(f"--resume: the corpus' symbol table differs from the one {path} was trained "
                         "with; the phoneme ids would mean other phonemes. Use the original corpus")
    run.symbols = ckpt.get("symbols") or run.symbols
    run.init = ckpt.get("init")
    rngs = ckpt["rng"]
    if len(rngs) == proc.world:
        _set_rng_state(rngs[proc.rank])
    else:
        proc.say(f"checkpoint was written by {len(rngs)} processes, now {proc.world}: random streams restart")
        _seed_all(run.cfg.train.seed + proc.rank + 7919 * run.state.step)
    proc.say(f"resumed {path} at step {run.state.step}")


# ---------------------------------------------------------------------------------------------- the loop


def _loop(run: _Run, batches: Iterator[dict[str, Any]], out_dir: Path, proc: _Process) -> dict[str, Any]:
    """Train to cfg.train.steps, one optimizer step per iteration as in HiFi-GAN's train.py: D and G losses on a
    batch (`_train_step`), both optimizers step (a non-finite step is skipped instead), then the log, the mel
    image and the checkpoint at their intervals; a last checkpoint at the end."""
    t, state = run.cfg.train, run.state
    ckpt_path = out_dir / CHECKPOINT_NAME
    counts = parameter_counts(run.model, run.discriminators)
    log = _Log(out_dir, run, proc, counts)
    run.model.train()
    run.discriminators.train()
    consecutive = 0  # non-finite steps in a row
    try:
        while state.step < t.steps:
            finite, logs, batch, out = _train_step(run, batches, proc)
            state.step += 1
            if finite:
                run.opt_d.step()
                run.opt_g.step()
                run.sched_d.step()
                run.sched_g.step()
                consecutive = 0
            else:
                consecutive += 1
                _skip_step(run, logs, consecutive, out_dir, proc)
            log.progress(logs)
            if t.log_every and (state.step % t.log_every == 0 or state.step == t.steps):
                log.scalars(logs, state, run.sched_g.get_last_lr()[0])
            if t.image_every and state.step % t.image_every == 0:
                log.image(run.model, batch, out, state.step)
            if t.ckpt_every and state.step % t.ckpt_every == 0 and state.step < t.steps:
                _save_checkpoint(run, ckpt_path, proc, log.wall_s())
        _save_checkpoint(run, ckpt_path, proc, log.wall_s())
    finally:
        log.close()
    elapsed = log.elapsed()
    return {"step": state.step, "skipped": state.skipped, "history": log.history, "params": counts,
            "seconds": elapsed, "steps_per_s": (state.step - log.step_start) / max(elapsed, 1e-9),
            "checkpoint": str(ckpt_path), "config": run.cfg}


def _train_step(run: _Run, batches: Iterator[dict[str, Any]], proc: _Process
                ) -> tuple[bool, dict[str, float], Any, Any]:
    """One optimizer step's gradients (number `run.state.step`, counting from 0) over grad_accum micro-batches;
    the caller steps the optimizers. Returns (finite, logged values, last batch, last out)."""
    cfg, step = run.cfg, run.state.step
    accum = cfg.train.grad_accum
    adversarial = adversarial_active(cfg.loss, step)
    run.opt_g.zero_grad(set_to_none=True)
    run.opt_d.zero_grad(set_to_none=True)
    g_params = [p for p in run.model.parameters() if p.requires_grad]
    logs: dict[str, float] = defaultdict(float)
    finite = True
    batch = out = None
    for i in range(accum):
        batch = _to_device(next(batches), proc.device)
        last = i == accum - 1
        with _no_sync(run.gen, not last), _no_sync(run.disc, not last):
            out = run.gen(batch)
            real, fake = out["wav"], out["wav_hat"]
            if adversarial:
                # discriminator: one call on [real; fake] (a single DDP forward), generator output detached
                (real_scores, _), (fake_scores, _) = split_halves(run.disc(torch.cat([real, fake.detach()])),
                                                                  real.shape[0])
                loss_d = discriminator_loss(real_scores, fake_scores)
                (loss_d / accum).backward()
                # generator: through the raw discriminators, gradients only into the generator's parameters
                with torch.no_grad():
                    _, real_fmaps = run.discriminators(real)
                fake_scores, fake_fmaps = run.discriminators(fake)
            else:  # reconstruction-only warm-up: the discriminators are not run at all
                loss_d = real.new_zeros(())
                fake_scores = real_fmaps = fake_fmaps = None
            loss_g, parts = generator_loss(out, fake_scores, real_fmaps, fake_fmaps, cfg.loss, step)
            torch.autograd.backward(loss_g / accum, inputs=g_params)
        finite = finite and bool(torch.isfinite(loss_g)) and bool(torch.isfinite(loss_d))
        logs["loss_g"] += float(loss_g.detach()) / accum
        logs["loss_d"] += float(loss_d.detach()) / accum
        for k, v in parts.items():
            logs[k] += v / accum
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    gn_d = torch.nn.utils.clip_grad_norm_(run.discriminators.parameters(), clip)
    gn_g = torch.nn.utils.clip_grad_norm_(g_params, clip)
    logs["grad_norm_g"], logs["grad_norm_d"] = float(gn_g), float(gn_d)
    finite = finite and math.isfinite(logs["grad_norm_g"]) and math.isfinite(logs["grad_norm_d"])
    if proc.world > 1:  # every process must take the same decision
        flag = torch.tensor([1.0 if finite else 0.0], device=proc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item() == 1.0)
    return finite, dict(logs), batch, out


def _no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    return module.no_sync() if skip and isinstance(module, DDP) else contextlib.nullcontext()


def _skip_step(run: _Run, logs: dict[str, float], consecutive: int, out_dir: Path, proc: _Process) -> None:
    """A step with a non-finite loss or gradient: counted and its gradients dropped; `train.max_nonfinite` of them
    in a row stop the run (NonFiniteLossError)."""
    state = run.state
    state.skipped += 1
    run.opt_g.zero_grad(set_to_none=True)
    run.opt_d.zero_grad(set_to_none=True)
    proc.say(f"step {state.step}: non-finite loss or gradient (loss_g={logs['loss_g']:.4g}, "
             f"loss_d={logs['loss_d']:.4g}, grad norms {logs['grad_norm_g']:.4g}/{logs['grad_norm_d']:.4g})"
             f"; step skipped ({consecutive} in a row)")
    if consecutive >= run.cfg.train.max_nonfinite:
        raise NonFiniteLossError(
            f"{consecutive} consecutive steps had a non-finite loss or gradient (last at step "
            f"{state.step}); stopping. Lower train.lr, check the corpus for broken features, or "
            f"resume from the last checkpoint in {out_dir}")


def _save_checkpoint(run: _Run, path: Path, proc: _Process, seconds: float) -> None:
    """Write the checkpoint (rank 0; atomically). Collective: every process gives its RNG states."""
    run.state.seconds = seconds
    rngs = _gather_rng(proc.world)
    if proc.is_main:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "version": 1, "config": config_to_dict(run.cfg),
            "state": dataclasses.asdict(run.state), "model": run.model.state_dict(),
            "discriminators": run.discriminators.state_dict(), "optim_g": run.opt_g.state_dict(),
            "optim_d": run.opt_d.state_dict(), "sched_g": run.sched_g.state_dict(),
            "sched_d": run.sched_d.state_dict(), "rng": rngs, "symbols": run.symbols, "world_size": proc.world,
            "recipe_changes": run.recipe_changes, "init": run.init,
        }, path)


# ----------------------------------------------------------------------------------------------- logging


class _Log:
    """The run's clock, and rank 0's record of it: config.toml, the progress bar, metrics.jsonl, TensorBoard
    scalars and mel images (other ranks keep only the clock)."""

    def __init__(self, out_dir: Path, run: _Run, proc: _Process, counts: dict[str, int]) -> None:
        from tqdm import tqdm

        self.out_dir, self.main = out_dir, proc.is_main
        self.history: list[dict[str, float]] = []
        self.writer = None
        cfg, state = run.cfg, run.state
        if self.main:
            (out_dir / "images").mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.toml")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tb"))
            proc.say(f"BitTTS preset={cfg.name} quant={cfg.quant.scheme}/{cfg.quant.scope} device={proc.device} "
                     f"processes={proc.world} params: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
        self.bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not (self.main and proc.progress),
                        dynamic_ncols=True, desc=f"train {cfg.name}", unit="step")
        self.start, self.step_start, self.seconds_before = time.perf_counter(), state.step, state.seconds
        # a resumed run appends after the lines up to its step (a run killed after its last checkpoint logged
        # steps that are now redone); a fresh one starts the file over (a directory may hold a crashed run's log)
        if self.main and state.step:
            truncate_metrics(out_dir / "metrics.jsonl", state.step)
        self.metrics = open(out_dir / "metrics.jsonl", "a" if state.step else "w") if self.main else None  # noqa: SIM115

    def elapsed(self) -> float:
        """Seconds since this process started training (set-up excluded)."""
        return time.perf_counter() - self.start

    def wall_s(self) -> float:
        """Training wall time over every resumed segment of the run."""
        return self.seconds_before + self.elapsed()

    def progress(self, logs: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(g=f"{logs['loss_g']:.3f}", d=f"{logs['loss_d']:.3f}", mel=f"{logs['mel']:.3f}",
                             dur=f"{logs['dur']:.3f}", refresh=False)

    def scalars(self, logs: dict[str, float], state: TrainState, lr: float) -> None:
        """One line of metrics.jsonl, the TensorBoard scalars and an entry of `history`."""
        if not self.main:
            return
        elapsed = self.elapsed()
        logs.update(step=state.step, lr=lr, skipped=state.skipped,
                    steps_per_s=(state.step - self.step_start) / max(elapsed, 1e-9), wall_s=self.seconds_before + elapsed)
        self.history.append(dict(logs))
        self.metrics.write(json.dumps(logs) + "\n")
        self.metrics.flush()
        for k, v in logs.items():
            if k != "step":
                group = "train/" if k in ("lr", "skipped", "steps_per_s", "wall_s") else "loss/"
                self.writer.add_scalar(group + k, v, state.step)

    def image(self, model: BitTTS, batch: dict[str, Any], out: dict[str, Any], step: int) -> None:
        if self.main:
            rgb = _snapshot(model, batch, out, self.out_dir / "images" / f"mel_{step:07d}.png")
            self.writer.add_image("mel", rgb, step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
