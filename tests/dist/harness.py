"""Helpers for distributed tests: spawn gloo ranks, build a mesh, compare tensors against the serial model.

Worker functions must be module-level (picklable). Import from a test module in this package with
``from .harness import ...``. Each spawn of 4 gloo ranks costs a few seconds, so group cases into
one worker that returns {case name: [mismatch messages]} and assert in the parent per test.
"""

from __future__ import annotations

import torch

from modelpar.runtime.launch import spawn
from modelpar.runtime.mesh import ParallelContext, ParallelDims

DEFAULT_TIMEOUT_S = 240.0


def run_ranks(fn, world_size: int, *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """fn(rank, world_size, *args) on world_size gloo ranks; the per-rank return values."""
    return spawn(fn, world_size, args, timeout_s=timeout_s, backend="gloo")


def make_context(tensor: int = 1, pipeline: int = 1, data: int = 1) -> ParallelContext:
    """A ParallelContext for the running process group (call on every rank, same order)."""
    return ParallelContext(ParallelDims(tensor=tensor, pipeline=pipeline, data=data))


def mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> list[str]:
    """[] when close (torch.allclose semantics), else one message with the worst element."""
    if actual.shape != expected.shape:
        return [f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.allclose(actual, expected, rtol=rtol, atol=atol):
        return []
    error = (actual - expected).abs()
    worst = int(error.argmax())
    return [f"{name}: max abs error {float(error.max()):.3e} at flat index {worst} "
            f"(got {float(actual.flatten()[worst]):.6e}, want {float(expected.flatten()[worst]):.6e})"]


def dict_mismatches(prefix: str, actual: dict, expected: dict, rtol: float, atol: float) -> list[str]:
    """Compare two {name: tensor} dicts key by key (missing keys are mismatches)."""
    problems = []
    if set(actual) != set(expected):
        problems.append(f"{prefix}: keys differ: only actual {sorted(set(actual) - set(expected))[:4]}, "
                        f"only expected {sorted(set(expected) - set(actual))[:4]}")
    for name in sorted(set(actual) & set(expected)):
        problems += mismatch(f"{prefix}{name}", actual[name], expected[name], rtol, atol)
    return problems


def relative_mismatch(name: str, actual: float, expected: float, rtol: float) -> list[str]:
    if abs(actual - expected) <= rtol * abs(expected):
        return []
    return [f"{name}: {actual!r} vs {expected!r} (relative error {abs(actual / expected - 1):.2e} > {rtol})"]


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) [batch, seq], identical on every rank for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab_size, (batch, seq + 1), generator=generator)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()
