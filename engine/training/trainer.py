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
    "TrainState",
    "TrainingPaused",
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


def _batches(draw, name: str, seed: int, first: int, steps: int, pool, prefetch: int):
    """Yield the batches of steps ``first..steps-1`` in order, ``prefetch`` ahead when pooled."""
    if pool is None:
        for step in range(first, steps):
            yield draw(_step_rng(seed, step))
        return
    pending: deque = deque()
    nxt = first
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


@dataclass
class TrainState:
    """Where one stage's training stands: enough to continue it exactly (see :func:`train_stage`).

    ``step`` steps are done; ``net`` and ``optimizer`` are state dicts (on the CPU);
    ``loss_sum``/``loss_count`` the loss accumulated since the last history entry; ``torch_rng``
    the CPU generator state. Batches need no sampler state: batch ``i`` is drawn from ``(seed, i)``.
    """

    step: int
    net: dict
    optimizer: dict
    history: list[dict]
    loss_sum: float
    loss_count: int
    torch_rng: torch.Tensor
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


class TrainingPaused(Exception):
    """Training stopped early (SIGTERM, time budget) after saving ``state``; resume from it."""

    def __init__(self, name: str, state: TrainState) -> None:
        super().__init__(f"{name} paused after step {state.step}")
        self.name, self.state = name, state


def _cpu(obj):
    """A state dict with every tensor on the CPU (a checkpoint loads on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


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
    start: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every_s: float = 300.0,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict]:
    """Train ``net`` in place for ``settings.steps`` steps; returns the loss history.

    Learning rate: linear warm-up over 5% of the steps, then cosine decay to 2% of ``lr``, always
    over the full ``settings.steps`` (a time budget never shortens the schedule: it pauses).
    Batch ``i`` is drawn with its own generator seeded by ``(seed, i)``, in this process or in
    ``pool`` (see :func:`make_batch_pool`; ``draw`` must then be among its ``draws`` under ``name``).

    Checkpoints: every ``checkpoint_every_s`` seconds ``on_checkpoint(state)`` receives a
    :class:`TrainState`; when ``should_stop()`` turns true (checked after each step) it receives
    one more and :class:`TrainingPaused` is raised. ``start`` continues from such a state: N steps,
    a pause and a resume to 2N give the weights of 2N steps in one go (to float tolerance).
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
    first, acc, count, before = 0, torch.zeros((), device=device), 0, 0.0
    if start is not None:
        net.load_state_dict(start.net)
        opt.load_state_dict(start.optimizer)
        torch.set_rng_state(start.torch_rng)
        first, history, before = start.step, list(start.history), start.seconds
        acc, count = torch.tensor(start.loss_sum, device=device), start.loss_count
    t0 = time.perf_counter()
    last_ckpt = t0

    def state(done: int) -> TrainState:
        return TrainState(
            step=done,
            net=_cpu(net.state_dict()),
            optimizer=_cpu(opt.state_dict()),
            history=list(history),
            loss_sum=float(acc),
            loss_count=count,
            torch_rng=torch.get_rng_state(),
            seconds=before + time.perf_counter() - t0,
        )

    lr = settings.lr
    for step, batch in enumerate(_batches(draw, name, seed, first, steps, pool, PREFETCH), first):
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
        acc = acc + loss.detach()
        count += 1
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            running = float(acc) / count  # mean loss since the last log (syncs the device)
            acc, count = torch.zeros((), device=device), 0
            elapsed = before + time.perf_counter() - t0
            history.append({"step": step + 1, "loss": running, "lr": lr, "seconds": elapsed})
            log.info(
                "%s step %d/%d loss %.4f lr %.2e %.0fs", name, step + 1, steps, running, lr, elapsed
            )
            if progress is not None:
                progress(step + 1, steps, running)
        if step + 1 < steps:
            if should_stop is not None and should_stop():
                st = state(step + 1)
                if on_checkpoint is not None:
                    on_checkpoint(st)
                net.cpu().eval()
                raise TrainingPaused(name, st)
            if on_checkpoint is not None and time.perf_counter() - last_ckpt >= checkpoint_every_s:
                on_checkpoint(state(step + 1))
                last_ckpt = time.perf_counter()
    net.cpu().eval()
    return history
