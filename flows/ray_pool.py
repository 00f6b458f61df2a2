"""Ray fan-out: loader tasks feeding a pool of engine actors, with bounded work in flight.

The shape follows nnU-Net's predictor and Ray Data's callable classes: each actor loads its engine
once in ``__init__`` and then maps studies; decoding and preprocessing run as separate Ray tasks
*ahead* of inference, so the engines never wait on disk, and at most ``max_in_flight`` decoded
volumes exist at once, so memory stays bounded whatever the archive's size.

A study whose actor dies (process crash, node lost) is resubmitted to a fresh actor up to
``max_attempts`` times; after that it becomes a failure with code ``worker_died``. Every other error
is caught inside the task/actor and returned as a value, so one bad study never stops the pool.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError, WorkerCrashedError

log = logging.getLogger(__name__)

__all__ = ["WorkItem", "WorkOutcome", "run_pool", "init_ray", "engine_placements", "engine_slots"]


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: a key (the study UID) and the plain payload the loader needs."""

    key: str
    payload: Any


@dataclass
class WorkOutcome:
    """What came back for one item: ``value`` from the actor, or an error code and message."""

    key: str
    value: Any = None
    error_code: str | None = None
    message: str = ""
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)


def init_ray(
    address: str | None, *, num_cpus: int | None = None, temp_dir: str | None = None
) -> None:
    """Join a cluster at ``address`` or start a local runtime (no dashboard, no usage stats)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        kwargs: dict[str, Any] = {}
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **kwargs,
        )


def engine_slots(resources: dict[str, float], *, gpu: bool) -> int:
    """Engine actors these resources (a node's or the cluster's) hold: one per GPU for a GPU
    engine, else one per two CPUs (the other half decode for them), one on a single CPU; 0 with
    nothing to run on."""
    if gpu:
        return int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 0))
    return cpus // 2 or cpus


def engine_placements(*, gpu: bool) -> Iterator[Any]:
    """Scheduling strategies that put engine actors on the cluster's nodes in turn, forever.

    Ray's ``SPREAD`` is best effort: on a loaded machine it was seen to put both actors of a
    two-node cluster on the head. Here each alive node gets a turn per engine slot it holds (one
    per GPU, else one per two CPUs; a node with neither is skipped), round by round, so actor
    ``k`` goes to a node of its own before any node gets a second. ``soft=True``: a node that is
    full or gone (a replacement after a node loss) lets Ray place the actor anywhere.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    slots: list[tuple[str, int]] = []
    for node in ray.nodes():
        n = engine_slots(node.get("Resources", {}), gpu=gpu)
        if node.get("Alive") and n:
            slots.append((node["NodeID"], n))
    order = [nid for r in range(max((n for _, n in slots), default=0)) for nid, n in slots if n > r]
    if not order:
        while True:
            yield "SPREAD"
    while True:
        for nid in order:
            yield NodeAffinitySchedulingStrategy(node_id=nid, soft=True)


def run_pool(
    items: Iterable[WorkItem],
    *,
    load: Callable[[Any], Any],
    actor_factory: Callable[[], Any],
    n_actors: int,
    max_in_flight: int,
    max_attempts: int = 2,
    load_options: dict[str, Any] | None = None,
    capacity: Callable[[], int] | None = None,
    load_timeout_s: float | None = None,
    replace_after_s: float = 60.0,
) -> Iterator[WorkOutcome]:
    """Yield one :class:`WorkOutcome` per item, in completion order.

    Args:
        items: work to do; consumed lazily.
        load: a plain function ``payload -> loaded`` run as a Ray task (decode + preprocess). It may
            return an exception-free sentinel; errors it raises come back as outcomes with the
            error's ``code`` attribute (or ``load_failed``).
        actor_factory: returns a new Ray actor handle exposing ``process.remote(key, loaded)``
            which returns a value (errors inside should be returned, not raised).
        n_actors: number of engine actors.
        max_in_flight: loaded-but-not-finished items allowed at once (>= n_actors).
        max_attempts: attempts per item when an actor dies.
        load_options: ``.options(...)`` for the loader task (e.g. ``{"num_cpus": 1}``).
        capacity: how many engine actors the cluster can hold now. When an actor dies while
            others live, its replacement waits ``replace_after_s`` (the cluster takes seconds to
            notice that a node is gone; asked at once, it still counts the dead node's CPUs, and a
            replacement placed on the survivors would take the CPUs their loaders need: every
            actor idle, every loader pending, forever). Then it is replaced if the survivors leave
            room, else the pool shrinks. The last actor is always replaced at once. None: always
            replace at once.
        load_timeout_s: a loader running longer (e.g. a decoder hung on a corrupted codestream)
            is killed (``ray.cancel(force=True)``: its worker process only) and the item becomes
            an outcome with code ``decode_timeout``; the pool goes on.
    """
    if n_actors < 1:
        raise ValueError(f"n_actors must be >= 1, got {n_actors}")
    max_in_flight = max(max_in_flight, n_actors)
    # Two returns: a small status the driver fetches, and the loaded value, which goes from the
    # loader's node straight to an actor (the driver never pulls a decoded volume).
    load_task = ray.remote(_status_and_value).options(
        num_returns=2, **(load_options or {"num_cpus": 1})
    )
    actors = [actor_factory() for _ in range(n_actors)]
    idle: deque[int] = deque(range(n_actors))
    pending_items = iter(items)
    retry: deque[tuple[WorkItem, int]] = deque()
    loading: dict[ray.ObjectRef, tuple[WorkItem, int, ray.ObjectRef]] = {}
    started: dict[ray.ObjectRef, float] = {}
    ready: deque[tuple[WorkItem, int, ray.ObjectRef, float]] = deque()
    running: dict[ray.ObjectRef, tuple[WorkItem, int, int, ray.ObjectRef, float]] = {}
    replace_at: dict[int, float] = {}  # dead actors' slots -> when to decide on a replacement
    exhausted = False

    def again_or_lost(item: WorkItem, attempt: int, e: BaseException) -> WorkOutcome | None:
        """Queue another attempt, or (attempts spent) the ``worker_died`` outcome to yield."""
        if attempt < max_attempts:
            retry.append((item, attempt + 1))
            return None
        return WorkOutcome(item.key, error_code="worker_died", message=_short(e), attempts=attempt)

    def next_item() -> tuple[WorkItem, int] | None:
        nonlocal exhausted
        if retry:
            return retry.popleft()
        if exhausted:
            return None
        try:
            return next(pending_items), 1
        except StopIteration:
            exhausted = True
            return None

    while True:
        # 0. Dead actors' slots whose wait is over: replace, or shrink to what the cluster holds.
        for slot in [s for s, when in replace_at.items() if time.monotonic() >= when]:
            del replace_at[slot]
            live = sum(a is not None for a in actors)
            if capacity is None or live < capacity():
                actors[slot] = actor_factory()
                idle.append(slot)
            else:
                log.warning("engine pool shrinks to %d actors (cluster capacity)", live)
        # 1. Keep the loaders busy up to the in-flight bound.
        while len(loading) + len(ready) + len(running) < max_in_flight:
            nxt = next_item()
            if nxt is None:
                break
            item, attempt = nxt
            status_ref, value_ref = load_task.remote(load, item.payload)
            loading[status_ref] = (item, attempt, value_ref)
            started[status_ref] = time.monotonic()
        # 2. Hand loaded items to idle actors.
        while idle and ready:
            item, attempt, ref, t_loaded = ready.popleft()
            slot = idle.popleft()
            out = actors[slot].process.remote(item.key, ref)
            running[out] = (item, attempt, slot, ref, t_loaded)
        if not loading and not running and not ready:
            if exhausted and not retry:
                return
            continue
        waitable = list(loading) + list(running)
        done, _ = ray.wait(waitable, num_returns=1, timeout=5.0, fetch_local=False)
        if load_timeout_s is not None:
            now = time.monotonic()
            for ref in [r for r in loading if r not in done and now - started[r] > load_timeout_s]:
                item, attempt, _ = loading.pop(ref)
                started.pop(ref, None)
                ray.cancel(ref, force=True, recursive=False)
                log.warning("loader of one study ran past %.0fs: killed", load_timeout_s)
                yield WorkOutcome(
                    item.key,
                    error_code="decode_timeout",
                    message=f"loading ran past {load_timeout_s:.0f}s (a decoder hung?); killed",
                    attempts=attempt,
                )
        for ref in done:
            if ref in loading:
                item, attempt, value_ref = loading.pop(ref)
                started.pop(ref, None)
                try:
                    status = ray.get(ref)
                except (RayTaskError, WorkerCrashedError) as e:  # the loader process died
                    status = {"error_code": "load_failed", "message": _short(e)}
                except RayError as e:  # its node was lost with the result: load it again
                    log.warning("loader result lost (attempt %d): %s", attempt, _short(e))
                    if (lost := again_or_lost(item, attempt, e)) is not None:
                        yield lost
                    continue
                if status is not None:
                    yield WorkOutcome(
                        item.key,
                        error_code=status["error_code"],
                        message=status["message"],
                        attempts=attempt,
                    )
                    continue
                ready.append((item, attempt, value_ref, time.perf_counter()))
                continue
            item, attempt, slot, loaded_ref, t_loaded = running.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as e:
                log.warning(
                    "engine actor %d died on a study (attempt %d): %s", slot, attempt, _short(e)
                )
                actors[slot] = None
                if capacity is None or not any(a is not None for a in actors):
                    actors[slot] = actor_factory()
                    idle.append(slot)
                else:  # decided once the cluster knows whether the actor's node is gone
                    replace_at[slot] = time.monotonic() + replace_after_s
                if (lost := again_or_lost(item, attempt, e)) is not None:
                    yield lost
                continue
            except RayTaskError as e:
                idle.append(slot)
                cause = getattr(e, "cause", None) or e
                code = getattr(cause, "code", None) or "inference_failed"
                yield WorkOutcome(
                    item.key, error_code=code, message=_short(cause), attempts=attempt
                )
                continue
            except RayError as e:  # e.g. its input was on a node that is gone: run it again
                log.warning("study lost with a node (attempt %d): %s", attempt, _short(e))
                idle.append(slot)
                if (lost := again_or_lost(item, attempt, e)) is not None:
                    yield lost
                continue
            idle.append(slot)
            yield WorkOutcome(item.key, value=value, attempts=attempt)


def _status_and_value(load: Callable[[Any], Any], payload: Any) -> tuple[dict | None, Any]:
    """Run ``load`` and split its outcome: ``(None, value)`` or ``({error_code, message}, None)``."""
    try:
        return None, load(payload)
    except Exception as e:  # one bad study must never stop the pool: it becomes an outcome
        code = getattr(e, "code", None) or "load_failed"
        return {"error_code": str(code), "message": _short(e)}, None


def _short(e: BaseException, limit: int = 500) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
