"""ParallelPlan: the degrees and choices that the planner picks and the runtime executes, every
rule a plan must obey, and the one completion of a partial plan.

Any field may be None in a *partial* plan: the search then fills only those unknowns, and
`complete_plan` fills them with the documented defaults for `estimate`, `simulate` and `train`.

The rules are small functions that return the violated rule's *reason* (a short label, the key the
search counts its rejections by) or None; `explain` turns a reason into the one-line error that
names the value and the fix. `ParallelPlan.check` runs all of them, the search calls the same
functions on each candidate, and the runtime and the schedules call them for their parts: each
rule is written here once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from modelpar.specs.errors import SpecError
from modelpar.specs.fields import check_fields

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE_MODES = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)
RUNTIME_ZERO_STAGES = (0, 1)
"""ZeRO stages `modelpar train` implements (ZeRO-1: optimizer states sharded over data parallel)."""

DEFAULT_MICRO_BATCH_SIZE = 2
DEFAULT_MICRO_BATCHES_PER_STAGE = 2
COMPLETION_DEFAULTS = (
    "t = p = 1; d = N / (t p) with N devices, else 1; schedule 1f1b; v = 2 with the interleaved "
    f"schedule, else 1; b = {DEFAULT_MICRO_BATCH_SIZE}; B = b d x {DEFAULT_MICRO_BATCHES_PER_STAGE}p (two micro-batches "
    "per stage); no sequence parallelism, recompute none, ZeRO-0"
)

# --- reasons: what the search counts, what `explain` words as an error -------------------------
TP_HEADS = "tensor_parallel does not divide heads"
TP_KV = "tensor_parallel and key/value groups do not divide one another"
TP_FFN = "tensor_parallel does not divide ffn_hidden_size"
TP_NODE = "tensor_parallel exceeds devices per node"
DEVICES = "tensor x pipeline does not divide devices"
WORLD_SIZE = "data_parallel does not match devices / (tensor x pipeline)"
PP_LAYERS = "pipeline_parallel does not divide layers"
DP_BATCH = "data_parallel does not divide global batch"
MB_BATCH = "micro_batch x data_parallel does not divide global batch"
VIRTUAL_LAYERS = "layers not divisible by pipeline x virtual stages"
VIRTUAL_SCHEDULE = "virtual stages need the interleaved schedule"
INTERLEAVED_P = "interleaved needs pipeline_parallel > 1"
INTERLEAVED_V = "interleaved needs virtual_stages >= 2"
INTERLEAVED_M = "interleaved needs m % p == 0"
SP_TENSOR = "sequence parallel needs tensor_parallel > 1"
SP_SEQ = "sequence parallel needs seq_length % t == 0"
RUNTIME_ZERO = "zero stage not implemented by the runtime"


def tensor_rule(model, t: int) -> str | None:
    """Each tensor rank holds whole attention heads, whole key/value groups (or a replica of one:
    t and the groups divide one another, Megatron-LM's GQA rule) and 1/t of the MLP width
    (Shoeybi et al. 2019, Sec. 3)."""
    if model.num_attention_heads % t:
        return TP_HEADS
    if model.kv_heads % t and t % model.kv_heads:
        return TP_KV
    if model.ffn_hidden_size % t:
        return TP_FFN
    return None


def tensor_spans_nodes(t: int, devices_per_node: int) -> bool:
    """Tensor parallelism beyond a node puts its per-layer collectives on the inter-node network:
    the search never proposes it (Narayanan et al. 2021, Sec. 3.3: t up to the GPUs per server),
    but a plan that fixes it is legal (`note_tensor_across_nodes`)."""
    return t > devices_per_node


def note_tensor_across_nodes(t: int, devices_per_node: int) -> str:
    return (f"note: tensor_parallel {t} spans {-(-t // devices_per_node)} nodes of {devices_per_node} devices: "
            "its per-layer collectives cross the inter-node network")


def devices_rule(t: int | None, p: int | None, d: int | None, num_devices: int) -> str | None:
    """The degrees tile the devices: t x p x d = N, and while some are unknown the given ones
    divide N."""
    given = [degree for degree in (t, p, d) if degree is not None]
    product = math.prod(given)
    if len(given) == 3:
        return WORLD_SIZE if product != num_devices else None
    return DEVICES if num_devices % product else None


def layers_rule(model, p: int, v: int = 1) -> str | None:
    """Every global stage holds L / (p v) consecutive layers (uniform stages)."""
    if model.num_layers % p:
        return PP_LAYERS
    if model.num_layers % (p * v):
        return VIRTUAL_LAYERS
    return None


def batch_rule(global_batch_size: int, micro_batch_size: int | None, d: int) -> str | None:
    """B sequences split into d replicas of m = B / (b d) micro-batches of b sequences."""
    if micro_batch_size is None:
        return DP_BATCH if global_batch_size % d else None
    return MB_BATCH if global_batch_size % (micro_batch_size * d) else None


def schedule_rule(schedule: str, p: int, v: int, m: int | None = None) -> str | None:
    """v > 1 chunks per rank only with the interleaved schedule, which needs p > 1, v >= 2 and
    (Megatron-LM's rule: full groups of p micro-batches) m % p == 0."""
    if schedule != "interleaved":
        return VIRTUAL_SCHEDULE if v != 1 else None
    if p == 1:
        return INTERLEAVED_P
    if v < 2:
        return INTERLEAVED_V
    if m is not None and not full_micro_batch_groups(m, p):
        return INTERLEAVED_M
    return None


def full_micro_batch_groups(m: int, p: int) -> bool:
    """The interleaved schedule runs micro-batches in groups of p (Megatron-LM's rule: m % p == 0)."""
    return m % p == 0


def sequence_rule(model, t: int, sequence_parallel: bool) -> str | None:
    """Sequence parallelism splits the sequence over the tensor group (Korthikanti et al. 2022,
    Sec. 4.2.2): it needs t > 1 and s divisible by t."""
    if not sequence_parallel:
        return None
    if t == 1:
        return SP_TENSOR
    return SP_SEQ if model.seq_length % t else None


def runtime_rule(plan: "ParallelPlan") -> str | None:
    """What `modelpar train` implements beyond the plan rules."""
    return RUNTIME_ZERO if plan.zero_stage not in RUNTIME_ZERO_STAGES else None


def explain(reason: str, plan: "ParallelPlan", model=None, num_devices: int | None = None) -> str:
    """The one-line error of a violated rule: the values involved and the fix."""
    t, p, d, v = plan.tensor_parallel, plan.pipeline_parallel, plan.data_parallel, plan.virtual_stages
    b, batch = plan.micro_batch_size, plan.global_batch_size
    name = f"'{model.name}'" if model is not None else "the model"
    if reason == TP_HEADS:
        heads = model.num_attention_heads
        return (f"plan: tensor_parallel {t} does not divide num_attention_heads {heads} of {name} (each tensor rank "
                f"holds whole heads: num_attention_heads {heads} is not divisible by {t}); use a divisor such as "
                f"{_largest_divisor_at_most(heads, t)}")
    if reason == TP_KV:
        return (f"plan: tensor_parallel {t} and num_query_groups {model.kv_heads} (key/value groups) of {name} must "
                f"divide one another; pick t that divides or is a multiple of {model.kv_heads}")
    if reason == TP_FFN:
        return (f"plan: tensor_parallel {t} does not divide ffn_hidden_size {model.ffn_hidden_size} of {name}; use a "
                f"divisor such as {_largest_divisor_at_most(model.ffn_hidden_size, t)}")
    if reason == DEVICES:
        given = [f"{label} {degree}" for label, degree in (("tensor", t), ("pipeline", p), ("data", d)) if degree]
        product = math.prod(degree for degree in (t, p, d) if degree)
        return (f"plan: {' x '.join(given)} = {product} devices per group does not divide the {num_devices} "
                "devices; pick degrees whose product divides it")
    if reason == WORLD_SIZE:
        return (f"plan: tensor {t} x pipeline {p} x data {d} = {t * p * d} devices, but there are {num_devices}; "
                f"make the product equal {num_devices}")
    if reason == PP_LAYERS and (v is None or v == 1):
        return (f"plan: num_layers {model.num_layers} is not divisible by pipeline_parallel {p}; use a divisor "
                f"such as {_largest_divisor_at_most(model.num_layers, p)}")
    if reason in (PP_LAYERS, VIRTUAL_LAYERS):
        return (f"plan: num_layers {model.num_layers} is not divisible by pipeline_parallel {p} x virtual_stages {v}"
                f" = {p * v}; choose stages that divide {model.num_layers}")
    if reason == DP_BATCH:
        return f"plan: global_batch_size {batch} is not divisible by data_parallel {d}"
    if reason == MB_BATCH:
        return (f"plan: global_batch_size {batch} is not divisible by micro_batch_size {b} x data_parallel {d} = "
                f"{b * d}")
    if reason == VIRTUAL_SCHEDULE:
        return f"plan: virtual_stages={v} needs schedule 'interleaved' (or set virtual_stages 1)"
    if reason == INTERLEAVED_P:
        return "plan: schedule 'interleaved' needs pipeline_parallel > 1"
    if reason == INTERLEAVED_V:
        return "plan: schedule 'interleaved' needs virtual_stages >= 2 (or use '1f1b')"
    if reason == INTERLEAVED_M:
        m = plan.num_micro_batches
        lower = m - m % p
        hint = f"{lower} or {lower + p}" if lower else f"{p}"
        return (f"plan: interleaved schedule needs the micro-batches per step ({m}) to be a multiple of "
                f"pipeline_parallel {p} (num_micro_batches = B / (b d)); use {hint} micro-batches (change "
                "global_batch_size or micro_batch_size) or schedule '1f1b'")
    if reason == SP_TENSOR:
        return "plan: sequence parallelism needs tensor_parallel > 1 (it splits the sequence over the tensor group)" \
               f"; got tensor_parallel {t}: drop sequence_parallel"
    if reason == SP_SEQ:
        return (f"plan: sequence parallel needs seq_length {model.seq_length} divisible by tensor_parallel {t}; "
                "pick t dividing it or disable sequence_parallel")
    if reason == RUNTIME_ZERO:
        stages = " or ".join(map(str, RUNTIME_ZERO_STAGES))
        return f"plan: zero_stage {plan.zero_stage} is not implemented by the runtime; use {stages} (ZeRO-1)"
    raise ValueError(f"unknown plan rule {reason!r}")


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
        default=None, metadata={"doc": "Megatron sequence parallelism around LayerNorm/dropout (needs t > 1)."}
    )
    recompute: str | None = field(default=None, metadata={
        "doc": "Activation recomputation: selective (attention core) or full (per layer).", "choices": RECOMPUTE_MODES})
    zero_stage: int | None = field(default=None, metadata={
        "doc": "ZeRO stage over data parallel.", "choices": ZERO_STAGES})
    schedule: str | None = field(default=None, metadata={"doc": "Pipeline schedule.", "choices": SCHEDULES})

    def __post_init__(self) -> None:
        check_fields(self, "plan")
        if self.context_parallel not in (None, 1):
            raise SpecError(f"plan: context_parallel={self.context_parallel} is not supported; use 1")

    # --- derived quantities (valid on complete plans) ---------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per pipeline per step: m = B / (b * d)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel)

    def unknowns(self) -> list[str]:
        return [name for name in PLAN_FIELDS if getattr(self, name) is None]

    def is_complete(self) -> bool:
        return not self.unknowns()

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "ParallelPlan":
        return replace(self, **changes)

    def degrees(self) -> str:
        """'t8 p64 d1', with ' v2' when ranks hold several chunks."""
        text = f"t{self.tensor_parallel} p{self.pipeline_parallel} d{self.data_parallel}"
        return text + (f" v{self.virtual_stages}" if self.virtual_stages and self.virtual_stages > 1 else "")

    def describe(self) -> str:
        """The one-line form every report prints: 't2 p4 d1 v2, interleaved, m=8, b=1' plus SP,
        recompute and ZeRO when set (fields still unknown print as '?')."""
        m = self.num_micro_batches if None not in (self.global_batch_size, self.micro_batch_size,
                                                   self.data_parallel) else "?"
        text = f"{self.degrees()}, {self.schedule or '?'}, m={m}, b={self.micro_batch_size or '?'}"
        extras = []
        if self.sequence_parallel:
            extras.append("SP")
        if self.recompute and self.recompute != "none":
            extras.append(f"recompute {self.recompute}")
        if self.zero_stage:
            extras.append(f"ZeRO-{self.zero_stage}")
        return text + (", " + ", ".join(extras) if extras else "")

    def violations(self, model=None, num_devices: int | None = None, runtime: bool = False) -> list[str]:
        """Reasons of every rule a complete plan breaks, in the order `check` reports them."""
        t, p, d, v = self.tensor_parallel, self.pipeline_parallel, self.data_parallel, self.virtual_stages
        found = [
            devices_rule(t, p, d, num_devices) if num_devices is not None else None,
            schedule_rule(self.schedule, p, v),
            batch_rule(self.global_batch_size, self.micro_batch_size, d),
        ]
        if found[-1] is None:
            found.append(schedule_rule(self.schedule, p, v, self.num_micro_batches))
        if model is not None:
            found += [tensor_rule(model, t), layers_rule(model, p, v)]
        found.append(sequence_rule(model, t, self.sequence_parallel) if model is not None or t == 1 else None)
        if runtime:
            found.append(runtime_rule(self))
        return list(dict.fromkeys(reason for reason in found if reason is not None))

    def check(self, model=None, num_devices: int | None = None, runtime: bool = False) -> None:
        """Raise SpecError naming the value and the fix when a complete plan cannot run: every plan
        rule above (world size, schedule, batch, heads / KV groups / MLP width, layers by stages
        x chunks, sequence parallelism) and, with `runtime`, what `modelpar train` implements."""
        missing = self.unknowns()
        if missing:
            raise SpecError(f"plan: {', '.join(missing)} not set; give them or let `modelpar plan` choose")
        broken = self.violations(model, num_devices, runtime)
        if broken:
            raise SpecError(explain(broken[0], self, model, num_devices))

    def check_partial(self, model, num_devices: int) -> None:
        """Reject fixed fields of a partial plan that no completion can make valid."""
        t, p, d = self.tensor_parallel, self.pipeline_parallel, self.data_parallel
        found = [
            tensor_rule(model, t) if t is not None else None,
            layers_rule(model, p) if p is not None else None,
            sequence_rule(model, t, bool(self.sequence_parallel)) if t is not None else None,
            devices_rule(t, p, d, num_devices) if (t, p, d) != (None, None, None) else None,
        ]
        broken = [reason for reason in found if reason is not None]
        if broken:
            raise SpecError(explain(broken[0], self, model, num_devices))


PLAN_FIELDS = tuple(f.name for f in fields(ParallelPlan))


def complete_plan(plan: ParallelPlan, num_devices: int | None = None) -> ParallelPlan:
    """Fill the unset fields of `plan` with the defaults (`COMPLETION_DEFAULTS`), the plan that
    `modelpar estimate`, `simulate` and `train` then run; set fields are kept as they are (check
    the result with `ParallelPlan.check`)."""
    t = plan.tensor_parallel or 1
    p = plan.pipeline_parallel or 1
    d = plan.data_parallel
    if d is None:
        d = 1
        if num_devices is not None:
            if devices_rule(t, p, None, num_devices):
                raise SpecError(explain(DEVICES, plan.with_(tensor_parallel=t, pipeline_parallel=p), None,
                                        num_devices))
            d = num_devices // (t * p)
    schedule = plan.schedule or "1f1b"
    v = plan.virtual_stages or (2 if schedule == "interleaved" else 1)
    b = plan.micro_batch_size or DEFAULT_MICRO_BATCH_SIZE
    return plan.with_(
        tensor_parallel=t, pipeline_parallel=p, data_parallel=d, context_parallel=plan.context_parallel or 1,
        virtual_stages=v, schedule=schedule, micro_batch_size=b,
        global_batch_size=plan.global_batch_size or b * d * DEFAULT_MICRO_BATCHES_PER_STAGE * p,
        sequence_parallel=bool(plan.sequence_parallel), recompute=plan.recompute or "none",
        zero_stage=plan.zero_stage if plan.zero_stage is not None else 0,
    )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(k for k in range(1, min(n, limit) + 1) if n % k == 0)
