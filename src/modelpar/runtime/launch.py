"""Start ranks: spawn local processes (CPU tests, single machine) or join a torchrun job.

`spawn(fn, world_size, args)` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes (start method "spawn") with an initialised process group, and returns each rank's
return value. It never hangs: if a rank raises or dies, the parent terminates the others and raises
`RankFailure` naming the rank and its error (polling every 0.1 s, so within seconds); past
``timeout_s`` it raises naming the ranks still running. Under torchrun (RANK and WORLD_SIZE in the
environment) it runs ``fn`` for this process's rank only.

``fn`` and ``args`` must be picklable (a module-level function). Return values travel back pickled.
Ranks are daemonic processes, so ``fn`` cannot start processes of its own (no DataLoader workers).

Backends: "gloo" (CPU), "nccl" (one GPU per rank: rank r of a spawn, or LOCAL_RANK under torchrun,
becomes the current CUDA device *before* ``init_process_group``, as NCCL requires), or "auto"
(`choose_backend`). Failure detection on NCCL: a spawned rank that dies is seen by the parent
within 0.1 s, and torchrun's agent sees its own node's workers; a peer on another node is only
noticed when a collective times out, so under torchrun the NCCL collective timeout defaults to
`TORCHRUN_NCCL_TIMEOUT_S` (45 s, inside the 60 s the issue allows) with
TORCH_NCCL_ASYNC_ERROR_HANDLING on, which makes the NCCL watchdog abort the stuck rank.
`spawn(collective_timeout_s=...)` (`modelpar train --collective-timeout`) sets the collective
timeout of any launch (long checkpoint writes on one rank while the others wait need more).

torch is imported inside the functions: `modelpar train`'s command module imports `RankFailure`
from here, and the planner's commands must start without torch.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

from modelpar.specs.errors import SpecError

POLL_INTERVAL_S = 0.1
TERMINATE_GRACE_S = 5.0
BACKENDS = ("gloo", "nccl", "auto")
TORCHRUN_NCCL_TIMEOUT_S = 45.0


class RankFailure(RuntimeError):
    """A spawned rank raised, died or timed out. ``rank`` is the first failing rank (None on timeout)."""

    def __init__(self, message: str, rank: int | None):
        super().__init__(message)
        self.rank = rank


def default_backend() -> str:
    """nccl when CUDA is available, else gloo."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def choose_backend(world_size: int) -> str:
    """For `world_size` ranks spawned on this machine: nccl when it has a GPU for each rank, else gloo."""
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def local_cuda_device(rank: int):
    """This process's GPU, cuda:LOCAL_RANK (a spawn sets LOCAL_RANK = rank; otherwise rank modulo
    the GPU count), made the current CUDA device. SpecError if there is none."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise SpecError("backend nccl needs CUDA GPUs but none is visible; use the gloo backend")
    local_rank = int(os.environ.get("LOCAL_RANK", rank % count))
    if not 0 <= local_rank < count:
        raise SpecError(f"local rank {local_rank} has no GPU of its own ({count} visible); start at most {count} "
                        f"ranks per node, one GPU each, or use the gloo backend")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def collective_timeout_s(requested: float | None, default_s: float) -> float:
    """`requested` seconds (`--collective-timeout`) if given, else `default_s`."""
    if requested is None:
        return default_s
    if isinstance(requested, bool) or not isinstance(requested, (int, float)) or not 0 < requested < float("inf"):
        raise SpecError(f"--collective-timeout {requested!r} must be a positive number of seconds")
    return float(requested)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def under_torchrun() -> bool:
    """True when the environment already names this process's rank (torchrun, SLURM wrappers)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MODELPAR_SPAWNED" not in os.environ


def init_distributed(rank: int, world_size: int, backend: str | None = None, timeout_s: float = 300.0) -> None:
    """init_process_group from MASTER_ADDR/MASTER_PORT in the environment (no-op if already
    initialised). NCCL: the local GPU becomes the current device first, and the watchdog's async
    error handling is on. `timeout_s`: the collective timeout."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # abort a rank stuck past the timeout
        local_cuda_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, fn: Callable,
            args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), MODELPAR_SPAWNED="1")
    try:
        import torch
        import torch.distributed as dist

        if backend == "gloo":  # ranks share this machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        init_distributed(rank, world_size, backend, timeout_s)  # nccl: cuda:<rank> becomes the device first
        value = fn(rank, world_size, *args)
        payload = pickle.dumps(value)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown errors must not hide the result
            pass
        results.put((rank, True, payload))
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent
        summary = f"{type(error).__name__}: {error}"
        results.put((rank, False, f"{summary}\n{traceback.format_exc()}"))


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(timeout=1.0)


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 300.0,
          backend: str = "gloo", collective_timeout: float | None = None) -> list[Any]:
    """Run fn(rank, world_size, *args) on every rank; return the values, indexed by rank.

    `timeout_s`: seconds before the launch is declared stuck; `collective_timeout`: the collective
    timeout of the process group (default: `timeout_s`, under torchrun with NCCL at most 45 s).

    `backend`: "gloo", "nccl" (needs a GPU per rank) or "auto" (`choose_backend`). Under torchrun
    only this process's entry is filled (the others are None), after initialising the default
    process group with `default_backend()` if needed (NCCL collective timeout 45 s, see above).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise SpecError(f"spawn: world_size must be a positive integer, got {world_size!r}")
    if backend not in BACKENDS:
        raise SpecError(f"spawn: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if under_torchrun():
        rank, env_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if env_world != world_size:
            raise SpecError(f"spawn: torchrun started {env_world} ranks but the plan needs {world_size}; "
                            f"run torchrun with --nproc-per-node x --nnodes = {world_size}")
        torchrun_backend = default_backend()
        default = min(timeout_s, TORCHRUN_NCCL_TIMEOUT_S) if torchrun_backend == "nccl" else timeout_s
        init_distributed(rank, world_size, torchrun_backend, collective_timeout_s(collective_timeout, default))
        values: list[Any] = [None] * world_size
        values[rank] = fn(rank, world_size, *args)
        return values

    if backend == "auto":
        backend = choose_backend(world_size)
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < world_size:
            raise SpecError(f"spawn: backend nccl needs one GPU per rank, {world_size} ranks but "
                            f"{torch.cuda.device_count()} GPUs visible; use fewer ranks or backend gloo")
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, backend,
                                              collective_timeout_s(collective_timeout, timeout_s), fn, args, results),
                        daemon=True, name=f"modelpar-rank-{rank}")
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        values = _collect(processes, results, world_size, timeout_s)
    except BaseException:
        _stop(processes)
        raise
    for process in processes:
        process.join(timeout=TERMINATE_GRACE_S)
    _stop(processes)
    return values


def _collect(processes, results, world_size: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def receive(wait_s: float) -> bool:
        try:
            rank, ok, payload = results.get(timeout=wait_s)
        except queue_module.Empty:
            return False
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
        return True

    def dead_without_report() -> dict[int, int]:
        return {rank: process.exitcode for rank, process in enumerate(processes)
                if process.exitcode is not None and rank not in values and rank not in errors}

    while len(values) < world_size:
        receive(POLL_INTERVAL_S)
        if errors or dead_without_report():
            _raise_failure(receive, dead_without_report, errors, world_size)
        if time.monotonic() > deadline:
            waiting = sorted(set(range(world_size)) - set(values))
            raise RankFailure(f"ranks {waiting} of {world_size} still running after {timeout_s:.0f} s "
                              f"(deadlock or too slow); raise timeout_s if the work is legitimately long", None)
    return [values[rank] for rank in range(world_size)]


def _raise_failure(receive, dead_without_report, errors: dict[int, str], world_size: int) -> None:
    """Name the root cause: a rank that died silently (its peers then fail in collectives) before
    one that raised; other ranks' errors, usually consequences, are listed after it."""
    settle_until = time.monotonic() + 1.0
    while time.monotonic() < settle_until:  # let in-flight reports and exits arrive
        receive(0.1)
    dead = dead_without_report()
    if dead:
        rank = min(dead)
        message = f"rank {rank} of {world_size} died with exit code {dead[rank]} before returning"
    else:
        rank = next(iter(errors))  # the first report: peers only fail after it exits
        message = f"rank {rank} of {world_size} failed: {errors[rank]}"
    others = [f"rank {other}: {text.splitlines()[0]}" for other, text in sorted(errors.items()) if other != rank]
    if others:
        message += "\nother ranks then failed: " + "; ".join(others)
    raise RankFailure(message, rank)
