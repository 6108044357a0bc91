"""Training in a child process, so the embedded worker cannot starve the server it lives in.

The embedded worker is a thread of the server process. Training there would share the
server's GIL, and ``torch.set_num_threads`` cannot cap it alone: with OpenMP the thread
count is per calling thread, but MKL's is process-wide, so capping training would cap
the engine's matmuls too. So each job's compute (parse the dataset, build the model,
train, export) runs in a child process with its own GIL and its own torch thread count,
at a higher niceness: under contention the kernel gives the server's threads the CPU first
(nice 10 weighs about a tenth of nice 0). Claiming, heartbeats, cancel checks and
registration stay in the worker thread, which talks to the child over a pipe.

Children are forked from a ``forkserver`` process that imported torch, transformers and
PEFT once (about 12 s of CPU that each spawned child would pay again); it is started on
the embedded worker's start (``prestart``) from a thread reniced first, so its imports
run niced too, in the background. Forking the
single-threaded forkserver is safe, unlike forking the server. This module imports
nothing heavy at the top, and every child renices all its threads before torch starts any.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0
PRELOAD = ["promptfleet.trainer.train", "promptfleet.platform.tokenizer"]
_forkserver_lock = threading.Lock()


class TrainingFailed(Exception):
    """The training process reported an error (the message says which) or died."""


@dataclass(frozen=True)
class Isolation:
    """How the embedded worker runs a job's training: niceness and torch intra-op threads."""

    nice: int = 10
    threads: int = 1


def default_train_threads() -> int:
    """Half the cores this process may run on, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def thread_niceness() -> list[int]:
    """The niceness of every thread of this process (Linux schedules threads, not processes)."""
    values = []
    for tid in os.listdir("/proc/self/task"):
        try:
            values.append(os.getpriority(os.PRIO_PROCESS, int(tid)))
        except (ProcessLookupError, PermissionError):  # the thread ended meanwhile
            continue
    return values


def renice_all_threads(nice: int) -> None:
    """Raise every thread of this process to at least ``nice`` (raising needs no privilege)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.getpriority(os.PRIO_PROCESS, int(tid)) < nice:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:
            continue


def _context(nice: int) -> Any:
    """The forkserver context, its server started (once) with ``PRELOAD`` imported at ``nice``."""
    from multiprocessing import forkserver

    mp = multiprocessing.get_context("forkserver")
    with _forkserver_lock:
        mp.set_forkserver_preload(PRELOAD)

        def start() -> None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
            forkserver.ensure_running()  # inherits this thread's niceness

        starter = threading.Thread(target=start, name="promptfleet-forkserver-start")
        starter.start()
        starter.join()
    return mp


def prestart(isolation: Isolation) -> None:
    """Start the forkserver now (its imports run in the background, niced), so the first
    job does not wait for them; the embedded worker calls this when it starts."""
    _context(isolation.nice)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _child_main(spec: dict[str, Any], isolation: Isolation, conn: Any, cancel: Any, log_level: int) -> None:
    """The training process: renice, cap torch threads, train, send the outcome back."""
    renice_all_threads(isolation.nice)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [train pid %(process)d]: "
                                                "%(message)s")
    import torch

    torch.set_num_threads(isolation.threads)
    from promptfleet.trainer.train import (TrainConfig, TrainingCancelled, WallClock, WallClockExceeded,
                                           train_dataset)

    try:
        wall = spec["wall_clock"]
        result = train_dataset(TrainConfig(**spec["config"]), spec["data"],
                               max_example_tokens=spec["max_example_tokens"],
                               validation_data=spec["validation_data"],
                               on_total=lambda total: conn.send(("total", total)),
                               progress=lambda step, total, loss: conn.send(("progress", step, total, loss)),
                               on_epoch=lambda entry: conn.send(("epoch", entry)),
                               should_cancel=cancel.is_set,
                               wall_clock=None if wall is None else WallClock(*wall))
        metrics = {**result.metrics, "isolation": {"pid": os.getpid(), "nice": min(thread_niceness()),
                                                   "torch_threads": torch.get_num_threads()}}
        conn.send(("done", result.adapter_config, result.safetensors_bytes, metrics))
    except TrainingCancelled as exc:
        conn.send(("cancelled", str(exc)))
    except WallClockExceeded as exc:
        conn.send(("wall_clock", str(exc)))
    except BaseException as exc:  # the worker fails the job with this text
        logging.getLogger(__name__).exception("training failed")
        conn.send(("error", _describe(exc)))
    finally:
        conn.close()


def train_in_child(config: Any, data: bytes, *, max_example_tokens: int, isolation: Isolation,
                   on_total: Callable[[int], None], progress: Callable[[int, int, float], None],
                   should_cancel: Callable[[], bool], wall_clock: Any = None, poll_s: float = 0.1,
                   validation_data: bytes | None = None,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """``train_dataset`` in a child process; returns its ``TrainResult``.

    Raises what it would raise in-process: ``TrainingCancelled`` (``should_cancel()`` turned
    True; the child stops before its next step), ``WallClockExceeded``, or ``TrainingFailed``
    with the child's error text (or its exit code when it died without a word, e.g. killed
    for memory).
    """
    from promptfleet.trainer.train import TrainingCancelled, TrainResult, WallClockExceeded

    mp = _context(isolation.nice)  # never fork the server itself: it runs threads
    receiver, sender = mp.Pipe(duplex=False)
    cancel = mp.Event()
    spec = {"config": dataclasses.asdict(config), "data": data, "max_example_tokens": max_example_tokens,
            "validation_data": validation_data,
            "wall_clock": None if wall_clock is None else (wall_clock.limit_s, wall_clock.started)}
    proc = mp.Process(target=_child_main, args=(spec, isolation, sender, cancel, logging.getLogger().level),
                      name="promptfleet-train", daemon=True)
    proc.start()
    sender.close()
    log.info("training in child process %d (nice %d, %d torch threads)", proc.pid, isolation.nice, isolation.threads)
    try:
        while True:
            if should_cancel():
                cancel.set()
            if not receiver.poll(poll_s):
                continue
            try:
                message = receiver.recv()
            except EOFError:
                break
            kind, args = message[0], message[1:]
            if kind == "total":
                on_total(*args)
            elif kind == "progress":
                progress(*args)
            elif kind == "epoch":
                if on_epoch is not None:
                    on_epoch(*args)
            elif kind == "done":
                return TrainResult(adapter_config=args[0], safetensors_bytes=args[1], metrics=args[2])
            elif kind == "cancelled":
                raise TrainingCancelled(args[0])
            elif kind == "wall_clock":
                raise WallClockExceeded(args[0])
            else:
                raise TrainingFailed(args[0])
        proc.join(JOIN_TIMEOUT_S)
        raise TrainingFailed(f"the training process exited with code {proc.exitcode} before it finished"
                             + (" (killed by a signal; out of memory?)" if (proc.exitcode or 0) < 0 else ""))
    finally:
        cancel.set()
        receiver.close()
        proc.join(JOIN_TIMEOUT_S)
        if proc.is_alive():
            log.warning("training process %d did not exit; killing it", proc.pid)
            proc.kill()
            proc.join()
