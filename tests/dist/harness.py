"""Helpers for distributed tests: spawn gloo ranks, build a mesh, compare tensors against the serial model.

Worker functions must be module-level (picklable). Import from a test module in this package with
``from .harness import ...``. Each spawn of 4 gloo ranks costs a few seconds, so group cases into
one worker that returns {case name: [mismatch messages]} and assert in the parent per test.

Training equivalence (tests/dist/test_equivalence.py, test_batched_p2p.py, tests/gpu): a `Case` is
a model, a plan and a dtype; `launch_cases` trains every case for `STEPS` AdamW steps in ONE
launch (`train_cases`: per case, the ranks it needs re-initialise the default process group on a
fresh FileStore, train, gather to the serial layout and destroy the group), `serial_reference`
trains the serial GPT on the same batches, and `training_mismatches` compares the two.
"""

from __future__ import annotations

import dataclasses
import datetime
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from modelpar.training.data import make_token_source
from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.runtime.launch import spawn
from modelpar.runtime.mesh import ParallelContext, ParallelDims
from modelpar.specs.model import ModelSpec
from modelpar.specs.plan import ParallelPlan
from modelpar.training.config import TrainConfig
from modelpar.training.trainer import RankTrainer

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


# --- training equivalence: a layout's training against the serial GPT's ---------------------------

STEPS = 3
SEED = 5
CASE_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Case:
    """One layout to train; `start_from_seed`: load the serial init of this seed as a checkpoint
    (any-layout loading) instead of initialising from `SEED`; `p2p`: the pipeline p2p mode
    (`TrainConfig.p2p`; None: the backend's default)."""

    name: str
    model: ModelSpec
    plan: ParallelPlan
    dtype: str = "fp32"
    start_from_seed: int | None = None
    p2p: str | None = None


def make_plan(t, p, d, schedule="1f1b", v=1, b=2, m=4, sp=False, recompute="none", zero=0) -> ParallelPlan:
    """A t x p x d plan with m micro-batches of b sequences per data-parallel replica."""
    return ParallelPlan(tensor_parallel=t, pipeline_parallel=p, data_parallel=d, virtual_stages=v, schedule=schedule,
                        micro_batch_size=b, global_batch_size=b * d * m, sequence_parallel=sp, recompute=recompute,
                        zero_stage=zero)


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """How close a layout trains to the serial model: in fp32 the losses, step-1 gradients and final
    weights; in bf16 the losses only. The defaults are the gloo (CPU, fp32-exact) ones."""

    loss_rtol: float = 1e-5
    grad_rtol: float = 1e-4
    grad_atol: float = 1e-6
    # Final weights after 3 AdamW steps: Adam maps gradient noise at elements whose true gradient
    # is zero (the key biases: softmax ignores them) to updates of up to lr * noise / (noise + eps),
    # so the bound is a fraction of the learning rate (3e-3); a mis-assembled shard is off by ~0.02.
    weight_rtol: float = 0.0
    weight_atol: float = 5e-4
    bf16_loss_rtol: float = 3e-2


def initial_state(case: Case) -> dict | None:
    """The serial init of `case.start_from_seed` (None: the trainer initialises from SEED)."""
    return init_gpt(case.model, case.start_from_seed).state_dict() if case.start_from_seed is not None else None


def run_in_own_groups(rank: int, world_size: int, items: list, store_dir: str, body: Callable,
                      backend: str = "gloo") -> dict:
    """On every rank: for each item (anything with `.name` and `.plan`) whose world includes this
    rank, a fresh default process group of `item.plan.world_size` ranks, `body(item, ctx)`, and
    the group destroyed again; rank 0 returns {item name: body's result + "seconds"}."""
    # A barrier before every destroy: gloo's init returns on a rank before its peers have finished
    # connecting, and destroying then would close sockets they still need.
    dist.barrier()
    dist.destroy_process_group()  # the launch's group; each item makes its own
    results = {}
    for index, item in enumerate(items):
        size = item.plan.world_size
        if rank >= size:
            continue
        started = time.perf_counter()
        dist.init_process_group(backend, init_method=f"file://{store_dir}/case{index}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=CASE_TIMEOUT_S))
        result = body(item, ParallelContext(ParallelDims.from_plan(item.plan)))
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            results[item.name] = {**result, "seconds": time.perf_counter() - started}
    # leave a default group for the launcher to destroy
    dist.init_process_group(backend, init_method=f"file://{store_dir}/final", rank=rank, world_size=world_size)
    dist.barrier()
    return results


def train_cases(rank: int, world_size: int, cases: list[Case], store_dir: str, backend: str = "gloo",
                inspect: Callable | None = None) -> dict:
    """On every rank: train each case whose world includes this rank; rank 0 returns
    {case name: {"losses", "grads" (step 1), "state" (final), "initial_state", "reports", "seconds"}}
    (gradients and weights gathered to the serial layout; None in bf16). `inspect(trainer, ctx)`
    runs after step 1's forward-backward and its picklable value, from every rank, is "reports".
    TF32 is off: the comparisons are exact."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def train(case: Case, ctx: ParallelContext) -> dict:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        config = TrainConfig(case.model, case.plan, STEPS, SEED, case.dtype, "synthetic", progress=False, p2p=case.p2p)
        trainer = RankTrainer(config, ctx, initial_state=initial_state(case))
        fp32 = case.dtype == "fp32"
        initial = trainer.full_state_dict() if fp32 else None
        losses = [trainer.forward_backward(0)]
        report = inspect(trainer, ctx) if inspect is not None else None
        grads = trainer.full_gradients() if fp32 else None
        trainer.optimizer_step()
        losses += [trainer.step(step) for step in range(1, STEPS)]
        state = trainer.full_state_dict() if fp32 else None
        reports = [None] * case.plan.world_size
        dist.all_gather_object(reports, report)
        return {"losses": losses, "grads": grads, "state": state, "initial_state": initial, "reports": reports}

    return run_in_own_groups(rank, world_size, cases, store_dir, train, backend)


def launch_with_store(worker: Callable, world_size: int, items: list, timeout_s: float, title: str) -> dict:
    """worker(rank, world_size, items, store_dir) (typically built on `run_in_own_groups`) on
    `world_size` gloo ranks with a fresh store directory; rank 0's {item name: result}, and one
    printed line of the launch's and each item's seconds."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store_dir:
        results = run_ranks(worker, world_size, items, store_dir, timeout_s=timeout_s)[0]
    print(f"\n{title} launch: {time.perf_counter() - started:.1f} s; "
          + ", ".join(f"{name} {result['seconds']:.1f}s" for name, result in results.items()))
    return results


def launch_cases(cases: list[Case], world_size: int, timeout_s: float, backend: str = "gloo",
                 inspect: Callable | None = None) -> dict:
    """`train_cases` on `world_size` ranks (gloo, or nccl with a GPU per rank); rank 0's results.
    `inspect` must be module-level (it is pickled to the ranks)."""
    with tempfile.TemporaryDirectory() as store_dir:
        args = (cases, store_dir, backend, inspect)
        return spawn(train_cases, world_size, args, timeout_s=timeout_s, backend=backend)[0]


def serial_reference(case: Case, device: str = "cpu") -> dict:
    """The serial GPT trained on the same batches with the same AdamW: losses, step-1 grads, final
    weights (returned on the CPU). `device`: where it runs; the attention-dropout masks come from
    the device's generator (`models.gpt._attention_keep_mask`), so compare a GPU run with a GPU
    reference."""
    config = TrainConfig(case.model, case.plan, STEPS, SEED, case.dtype, "synthetic", progress=False)
    model = init_gpt(case.model, SEED)
    initial = initial_state(case)
    if initial is not None:
        model.load_state_dict(initial)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.backends.cuda.matmul.allow_tf32 = False  # as on the ranks (`train_cases`): exact comparisons
    model.to(device)
    decayed = [param for param in model.parameters() if param.dim() >= 2]  # Megatron: no decay on biases, norms
    others = [param for param in model.parameters() if param.dim() < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)
    source = make_token_source("synthetic", case.model.vocab_size, SEED)
    losses, grads = [], None
    for step in range(STEPS):
        batch = source.global_batch(step, case.plan.global_batch_size, case.model.seq_length)
        batch = batch.to(device)
        loss = model(batch[:, :-1], batch[:, 1:], DropoutKey(SEED, step, 0))
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state, "initial_state": initial}


def training_mismatches(got: dict, want: dict, case: Case, tolerances: Tolerances = Tolerances()) -> list[str]:
    """`got` (a `train_cases` result) against `want` (`serial_reference`): fp32 losses, initial
    weights (exactly), step-1 gradients and final weights; bf16 losses only."""
    problems = []
    if case.dtype == "fp32":
        for step, (a, b) in enumerate(zip(got["losses"], want["losses"])):
            problems += relative_mismatch(f"loss of step {step}", a, b, tolerances.loss_rtol)
        problems += dict_mismatches("initial weight ", got["initial_state"], want["initial_state"], 0.0, 0.0)
        problems += dict_mismatches("grad ", got["grads"], want["grads"], tolerances.grad_rtol, tolerances.grad_atol)
        problems += dict_mismatches("weight ", got["state"], want["state"], tolerances.weight_rtol,
                                    tolerances.weight_atol)
    else:
        for step, (a, b) in enumerate(zip(got["losses"], want["losses"])):
            problems += relative_mismatch(f"bf16 loss of step {step}", a, b, tolerances.bf16_loss_rtol)
    return problems
