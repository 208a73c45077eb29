"""ParallelPlan: the degrees and choices that the planner picks and the runtime executes.

Any field may be None in a *partial* plan: the search then fills only those unknowns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from modelpar.specs.errors import SpecError

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE_MODES = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class ParallelPlan:
    """How one training step is split over devices. None = "not decided" (a partial plan)."""

    tensor_parallel: int | None = field(default=None, metadata={"doc": "Tensor (intra-operator) degree t."})
    pipeline_parallel: int | None = field(default=None, metadata={"doc": "Pipeline stages p."})
    data_parallel: int | None = field(default=None, metadata={"doc": "Data-parallel replicas d."})
    context_parallel: int | None = field(default=1, metadata={"doc": "Context-parallel degree (only 1 is supported)."})
    virtual_stages: int | None = field(
        default=None, metadata={"doc": "Model chunks per pipeline rank v (interleaved schedule; 1 otherwise)."}
    )
    micro_batch_size: int | None = field(default=None, metadata={"doc": "Sequences per micro-batch b."})
    global_batch_size: int | None = field(default=None, metadata={"doc": "Sequences per optimizer step B."})
    sequence_parallel: bool | None = field(
        default=None, metadata={"doc": "Megatron sequence parallelism around LayerNorm/dropout (needs t > 1 to matter)."}
    )
    recompute: str | None = field(default=None, metadata={"doc": "'none', 'selective' (attention core) or 'full' (per layer)."})
    zero_stage: int | None = field(default=None, metadata={"doc": "ZeRO stage over data parallel: 0, 1, 2 or 3."})
    schedule: str | None = field(default=None, metadata={"doc": "'gpipe', '1f1b' or 'interleaved'."})

    def __post_init__(self) -> None:
        for key in ("tensor_parallel", "pipeline_parallel", "data_parallel", "context_parallel",
                    "virtual_stages", "micro_batch_size", "global_batch_size"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise SpecError(f"plan: {key} must be a positive integer, got {value!r}")
        if self.context_parallel not in (None, 1):
            raise SpecError(f"plan: context_parallel={self.context_parallel} is not supported; use 1")
        if self.recompute is not None and self.recompute not in RECOMPUTE_MODES:
            raise SpecError(f"plan: recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise SpecError(f"plan: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise SpecError(f"plan: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.sequence_parallel is not None and not isinstance(self.sequence_parallel, bool):
            raise SpecError(f"plan: sequence_parallel must be true or false, got {self.sequence_parallel!r}")

    # --- derived quantities (valid on complete plans) ---------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per pipeline per step: m = B / (b * d)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel)

    def unknowns(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is None]

    def is_complete(self) -> bool:
        return not self.unknowns()

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "ParallelPlan":
        return replace(self, **changes)

    def check(self, model=None, num_devices: int | None = None) -> None:
        """Raise SpecError naming the value and the fix when a complete plan cannot run.

        Checks divisibility (world size, heads, KV groups, layers by stages x chunks, batch by
        micro-batch x replicas) and schedule constraints (interleaving needs m % p == 0).
        """
        missing = self.unknowns()
        if missing:
            raise SpecError(f"plan: {', '.join(missing)} not set; give them or let `modelpar plan` choose")
        t, p, d, v = self.tensor_parallel, self.pipeline_parallel, self.data_parallel, self.virtual_stages
        if num_devices is not None and t * p * d != num_devices:
            raise SpecError(
                f"plan: tensor {t} x pipeline {p} x data {d} = {t * p * d} devices, but there are {num_devices}; "
                f"make the product equal {num_devices}"
            )
        if self.schedule != "interleaved" and v != 1:
            raise SpecError(f"plan: virtual_stages={v} needs schedule 'interleaved' (or set virtual_stages 1)")
        if self.schedule == "interleaved" and p == 1:
            raise SpecError("plan: schedule 'interleaved' needs pipeline_parallel > 1")
        per_step = self.micro_batch_size * d
        if self.global_batch_size % per_step:
            raise SpecError(
                f"plan: global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x data_parallel {d} = {per_step}"
            )
        m = self.num_micro_batches
        if self.schedule == "interleaved" and m % p:
            raise SpecError(
                f"plan: interleaved schedule needs the micro-batches per step ({m}) to be a multiple of "
                f"pipeline_parallel {p}; change global_batch_size or micro_batch_size"
            )
        if self.zero_stage and d == 1:
            pass  # ZeRO over one replica is a no-op, not an error
        if model is None:
            return
        if model.num_attention_heads % t:
            raise SpecError(
                f"plan: tensor_parallel {t} does not divide num_attention_heads {model.num_attention_heads} of "
                f"'{model.name}'; use a divisor such as {_largest_divisor_at_most(model.num_attention_heads, t)}"
            )
        if model.kv_heads % t and t % model.kv_heads:
            raise SpecError(
                f"plan: tensor_parallel {t} and the {model.kv_heads} key/value groups of '{model.name}' "
                "must divide one another"
            )
        if model.ffn_hidden_size % t:
            raise SpecError(f"plan: tensor_parallel {t} does not divide ffn_hidden_size {model.ffn_hidden_size}")
        if model.num_layers % (p * v):
            raise SpecError(
                f"plan: num_layers {model.num_layers} is not divisible by pipeline_parallel {p} x virtual_stages {v}"
                f" = {p * v}; choose stages that divide {model.num_layers}"
            )
        if self.sequence_parallel and model.seq_length % t:
            raise SpecError(f"plan: sequence parallel needs seq_length {model.seq_length} divisible by tensor_parallel {t}")


    def check_partial(self, model, num_devices: int) -> None:
        """Reject fixed fields of a partial plan that no completion can make valid."""
        t, p, d = self.tensor_parallel, self.pipeline_parallel, self.data_parallel
        if t is not None and model.num_attention_heads % t:
            raise SpecError(
                f"plan: tensor_parallel {t} does not divide num_attention_heads {model.num_attention_heads} of "
                f"'{model.name}'; use a divisor such as {_largest_divisor_at_most(model.num_attention_heads, t)}"
            )
        if p is not None and model.num_layers % p:
            raise SpecError(
                f"plan: pipeline_parallel {p} does not divide num_layers {model.num_layers} of '{model.name}'; "
                f"use a divisor such as {_largest_divisor_at_most(model.num_layers, p)}"
            )
        fixed = 1
        for name, degree in (("tensor_parallel", t), ("pipeline_parallel", p), ("data_parallel", d)):
            if degree is not None:
                fixed *= degree
                if num_devices % fixed:
                    raise SpecError(
                        f"plan: {name} {degree} (with the other fixed degrees: {fixed} devices per group) does not "
                        f"divide the {num_devices} devices"
                    )
        if None not in (t, p, d) and t * p * d != num_devices:
            raise SpecError(
                f"plan: tensor {t} x pipeline {p} x data {d} = {t * p * d} devices, but there are {num_devices}"
            )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)
