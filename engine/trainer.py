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
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdacscreen.engine.network import UNet3d

__all__ = ["Batch", "StageTraining", "seg_loss", "train_stage", "set_determinism"]

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


def set_determinism(seed: int, threads: int) -> None:
    """Seed torch and fix the thread count (the same seed then gives the same weights)."""
    torch.manual_seed(seed)
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=True)


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
) -> list[dict]:
    """Train ``net`` in place for ``settings.steps`` steps; returns the loss history.

    Learning rate: linear warm-up over 5% of the steps, then cosine decay to 2% of ``lr``.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    weights = (
        None
        if settings.class_weights is None
        else torch.tensor(settings.class_weights, dtype=torch.float32)
    )
    warm = max(1, settings.steps // 20)
    history: list[dict] = []
    t0 = time.perf_counter()
    running = None
    for step in range(settings.steps):
        if step < warm:
            lr = settings.lr * (step + 1) / warm
        else:
            frac = (step - warm) / max(1, settings.steps - warm)
            lr = settings.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = draw(rng)
        x = torch.from_numpy(batch.x)
        y = torch.from_numpy(batch.y.astype(np.int64))
        out = net(x)
        if isinstance(out, tuple):
            seg, cls = out
            loss = seg_loss(seg, y, weights=weights)
            if batch.cls is not None:
                target = torch.from_numpy(batch.cls.astype(np.float32))[:, None]
                loss = loss + settings.cls_weight * F.binary_cross_entropy_with_logits(cls, target)
        else:
            loss = seg_loss(out, y, weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - t0
            history.append({"step": step + 1, "loss": running, "lr": lr, "seconds": elapsed})
            log.info(
                "%s step %d/%d loss %.4f lr %.2e %.0fs",
                name,
                step + 1,
                settings.steps,
                running,
                lr,
                elapsed,
            )
            if progress is not None:
                progress(step + 1, settings.steps, running)
    net.eval()
    return history
