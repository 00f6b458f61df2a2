"""The training loop shared by both stages: losses, optimiser, schedule, determinism.

A stage is trained from a ``draw(rng) -> Batch`` callable that builds one augmented batch on the
CPU (``x``: ``(B, 1, z, y, x)`` float32 model input, ``y``: ``(B, z, y, x)`` int64 class indices,
``cls``: ``(B,)`` float32 window labels or None).  Loss: cross-entropy + soft Dice over the
foreground classes, plus binary cross-entropy of the classification head when present.
Deterministic for a seed at a fixed thread count (single process, seeded NumPy and torch).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdacscreen.engine.errors import TrainingError
from pdacscreen.engine.network import UNet3d

__all__ = [
    "Batch",
    "StageTraining",
    "seg_loss",
    "train_stage",
    "set_determinism",
    "resolve_device",
    "make_batch_pool",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    x: np.ndarray
    y: np.ndarray
    cls: np.ndarray | None = None


@dataclass(frozen=True)
class StageTraining:
    """Optimisation settings of one stage."""

    steps: int
    lr: float = 2e-3
    weight_decay: float = 1e-5
    class_weights: tuple[float, ...] | None = None
    cls_weight: float = 0.5
    log_every: int = 50


def set_determinism(seed: int, threads: int, *, device: str = "cpu") -> None:
    """Seed torch and fix the thread count (on the CPU the same seed gives the same weights).

    On CUDA the fastest convolution algorithms are allowed instead (cuDNN autotuning, TF32), so
    a GPU run is reproducible only up to floating-point order.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(int(threads))
    if str(device).startswith("cuda"):
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; an impossible choice is an error."""

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {device}: torch sees no CUDA GPU on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise TrainingError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


# Batch drawing in worker processes.  ``draw`` callables are closures over the training studies:
# the pool's initializer hands them to each forked worker (fork passes them without pickling), and
# only the workers hold them.
_WORKER_DRAWS: dict[str, Callable[[np.random.Generator], Batch]] = {}
PREFETCH = 32  # batches in flight in the pool (at batch 16 of 24x40x56: about 110 MB)


def _init_worker(draws: dict[str, Callable[[np.random.Generator], Batch]]) -> None:
    _WORKER_DRAWS.update(draws)


def _step_rng(seed: int, step: int) -> np.random.Generator:
    # One generator per step: the batches do not depend on how many workers draw them.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))


def _draw_task(job: tuple[str, int, int]) -> Batch:
    name, seed, step = job
    return _WORKER_DRAWS[name](_step_rng(seed, step))


def make_batch_pool(workers: int, draws: dict[str, Callable[[np.random.Generator], Batch]]):
    """A forked process pool drawing the batches of ``draws`` (by name) for :func:`train_stage`;
    ``None`` for ``workers <= 1``. Fork it before CUDA is initialised in this process.
    """
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return None
    return mp.get_context("fork").Pool(
        processes=int(workers), initializer=_init_worker, initargs=(dict(draws),)
    )


def _batches(draw, name: str, seed: int, steps: int, pool, prefetch: int):
    """Yield the batches of steps ``0..steps-1`` in order, ``prefetch`` ahead when pooled."""
    if pool is None:
        for step in range(steps):
            yield draw(_step_rng(seed, step))
        return
    pending: deque = deque()
    nxt = 0
    while nxt < steps and len(pending) < prefetch:
        pending.append(pool.apply_async(_draw_task, ((name, seed, nxt),)))
        nxt += 1
    while pending:
        batch = pending.popleft().get()
        if nxt < steps:
            pending.append(pool.apply_async(_draw_task, ((name, seed, nxt),)))
            nxt += 1
        yield batch


def seg_loss(
    logits: torch.Tensor, target: torch.Tensor, *, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy + soft Dice (foreground classes, batch Dice) on ``(B, K, ...)`` logits."""
    ce = F.cross_entropy(logits, target, weight=weights)
    k = logits.shape[1]
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, k).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice[1:]).mean()


def train_stage(
    net: UNet3d,
    draw: Callable[[np.random.Generator], Batch],
    *,
    settings: StageTraining,
    seed: int,
    name: str = "stage",
    progress: Callable[[int, int, float], None] | None = None,
    device: str = "cpu",
    pool=None,
    max_seconds: float | None = None,
) -> list[dict]:
    """Train ``net`` in place for ``settings.steps`` steps; returns the loss history.

    Learning rate: linear warm-up over 5% of the steps, then cosine decay to 2% of ``lr``.
    Batch ``i`` is drawn with its own generator seeded by ``(seed, i)``, in this process or in
    ``pool`` (see :func:`make_batch_pool`; ``draw`` must then be among its ``draws`` under ``name``).
    ``max_seconds``: at step 60 (timed from step 20) the step count is lowered, once, to what
    fits the budget (logged, and visible in the history's last ``step``); the schedule follows it.
    The network ends on the CPU in eval mode.
    """
    torch.manual_seed(seed)
    net.to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    weights = (
        None
        if settings.class_weights is None
        else torch.tensor(settings.class_weights, dtype=torch.float32, device=device)
    )
    steps = settings.steps
    warm = max(1, steps // 20)
    history: list[dict] = []
    t0 = time.perf_counter()
    running = None
    acc, count = torch.zeros((), device=device), 0
    for step, batch in enumerate(_batches(draw, name, seed, steps, pool, PREFETCH)):
        if step >= steps:
            break
        if step < warm:
            lr = settings.lr * (step + 1) / warm
        else:
            frac = (step - warm) / max(1, steps - warm)
            lr = settings.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.from_numpy(batch.x).to(device, non_blocking=True)
        y = torch.from_numpy(batch.y.astype(np.int64)).to(device, non_blocking=True)
        out = net(x)
        if isinstance(out, tuple):
            seg, cls = out
            loss = seg_loss(seg, y, weights=weights)
            if batch.cls is not None:
                target = torch.from_numpy(batch.cls.astype(np.float32))[:, None].to(device)
                loss = loss + settings.cls_weight * F.binary_cross_entropy_with_logits(cls, target)
        else:
            loss = seg_loss(out, y, weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        if max_seconds is not None and step == 20:
            t20 = time.perf_counter()
        if max_seconds is not None and step == 60 and steps == settings.steps:
            now = time.perf_counter()
            per_step = (now - t20) / 40  # after warm-up (autotuning, pool start)
            fit = step + 1 + int((max_seconds - (now - t0)) / per_step)
            if fit < steps:
                log.warning(
                    "%s: %.3fs per step; %d steps fit the %.0fs budget, not %d: lowering the "
                    "step count (the schedule follows)",
                    name,
                    per_step,
                    max(fit, 61),
                    max_seconds,
                    steps,
                )
                steps = max(fit, 61)
                warm = min(warm, max(1, steps // 20))
        acc += loss.detach()
        count += 1
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            running = float(acc) / count  # mean loss since the last log (syncs the device)
            acc, count = torch.zeros((), device=device), 0
            elapsed = time.perf_counter() - t0
            history.append({"step": step + 1, "loss": running, "lr": lr, "seconds": elapsed})
            log.info(
                "%s step %d/%d loss %.4f lr %.2e %.0fs",
                name,
                step + 1,
                steps,
                running,
                lr,
                elapsed,
            )
            if progress is not None:
                progress(step + 1, steps, running)
    net.cpu().eval()
    return history
