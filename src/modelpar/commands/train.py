"""`modelpar train` on the command line (contract in DESIGN.md): the flags (`add_arguments`), the
command (`run`: complete the plan, call `run_training`, print), and the human summary, pictures and
trace of a run. The training itself is `modelpar.training`; it loads torch, so `run` imports it
only when a run starts and `modelpar plan` / `modelpar --help` never do.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from modelpar.report.tables import print_json
from modelpar.commands import flags
from modelpar.report.comparison import print_comparison
from modelpar.report.timeline import events_from_runtime, gantt_png, side_by_side_png, write_chrome_trace
from modelpar.schedules.events import TimelineEvent
from modelpar.runtime.launch import RankFailure
from modelpar.schedules.p2p import P2P_MODES
from modelpar.specs import ParallelPlan, load_cluster, load_model, load_plan
from modelpar.specs.plan import RUNTIME_ZERO_STAGES, complete_plan
from modelpar.training.config import DEFAULT_CLIP_GRAD, DEFAULT_LEARNING_RATE, DEFAULT_STEPS, DEFAULT_WEIGHT_DECAY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `modelpar train` flags (DESIGN.md contract). Plan flags override a --plan file's fields;
    anything left unset takes the defaults of `specs.plan.complete_plan`."""
    parser.add_argument("--model", required=True, help="model preset name or JSON file (e.g. gpt-tiny)")
    parser.add_argument("--plan", help="plan JSON file (a `modelpar plan --json` document works too)")
    flags.add_plan_arguments(parser, searched=False, choices={"zero_stage": RUNTIME_ZERO_STAGES})
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 with fp32 master weights and main gradients (default fp32)")
    parser.add_argument("--steps", type=flags.positive_int, default=DEFAULT_STEPS,
                        help=f"optimizer steps to run (default {DEFAULT_STEPS}; resumed: steps after the checkpoint)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights, the synthetic data and the dropout masks (default 0)")
    parser.add_argument("--data", help="text file (byte-level tokens), or 'synthetic'; default: the packaged corpus")
    optimizer = parser.add_argument_group("optimizer (AdamW, betas 0.9/0.95)")
    optimizer.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE, help="peak learning rate")
    optimizer.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    optimizer.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="constant",
                           help="after the warmup (default constant)")
    optimizer.add_argument("--lr-decay-steps", type=int, help="step where the decay reaches --min-learning-rate "
                                                               "(default: --steps, after the resumed checkpoint's)")
    optimizer.add_argument("--min-learning-rate", type=float, default=0.0, help="floor of the decay (default 0)")
    optimizer.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                           help="decoupled weight decay of weight matrices and embeddings (not biases and norm "
                                f"weights; default {DEFAULT_WEIGHT_DECAY})")
    optimizer.add_argument("--clip-grad", type=float, default=DEFAULT_CLIP_GRAD, metavar="NORM",
                           help="clip the global gradient norm to NORM (default 0: off; Megatron uses 1.0)")
    parser.add_argument("--cluster", help="cluster preset/JSON/'local' for the planner's prediction and the MFU peak "
                                          "(default on CPU: the `modelpar profile` of this machine, if any)")
    parser.add_argument("--load-checkpoint", metavar="PATH",
                        help="resume from a checkpoint (weights, AdamW state, step; saved by any plan)")
    parser.add_argument("--save-checkpoint", metavar="PATH",
                        help="save the final weights, AdamW state and step count (serial layout, loads into any plan)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are declared stuck")
    parser.add_argument("--collective-timeout", type=float, metavar="SECONDS",
                        help="timeout of one collective (default: --timeout; under torchrun with NCCL 45 s, so a "
                             "dead peer on another node is noticed within a minute)")
    parser.add_argument("--p2p", choices=P2P_MODES, help="pipeline point-to-point: 'tagged' (gloo's tag matching, "
                        "the gloo default) or 'batched' (one batch_isend_irecv per lockstep round, the NCCL default)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    parser.add_argument("--png", help="draw the predicted and measured timelines of the last step side by side")
    parser.add_argument("--trace", help="write the measured per-rank timeline as Chrome trace JSON (Perfetto)")


def optimizer_options_from_args(args: argparse.Namespace) -> dict:
    """The optimizer flags as `run_training` keyword arguments (validated by `validate_training`)."""
    return {"weight_decay": args.weight_decay, "clip_grad": args.clip_grad, "lr_warmup_steps": args.lr_warmup_steps,
            "lr_decay_style": args.lr_decay_style, "lr_decay_steps": args.lr_decay_steps,
            "min_learning_rate": args.min_learning_rate}


def train_plan(args: argparse.Namespace) -> ParallelPlan:
    """The --plan file with the plan flags over it, completed (`specs.plan.complete_plan`)."""
    return complete_plan(flags.plan_from_args(args, load_plan(args.plan) if args.plan else None))


def run(args: argparse.Namespace) -> int:
    """`modelpar train`: SpecError propagates (the CLI prints it, exit 2); a failed rank is exit 1."""
    from modelpar.training.run import run_training  # torch: only once a run starts (module docstring)

    model = load_model(args.model)
    plan = train_plan(args)
    cluster = load_cluster(args.cluster) if args.cluster else None
    try:
        summary = run_training(model, plan, args.steps, args.seed, args.dtype, args.data,
                               learning_rate=args.learning_rate, cluster=cluster, timeout_s=args.timeout,
                               collective_timeout_s=args.collective_timeout, p2p=args.p2p,
                               progress=not args.json or sys.stderr.isatty(),
                               load_checkpoint=args.load_checkpoint, save_checkpoint=args.save_checkpoint,
                               **optimizer_options_from_args(args))
    except RankFailure as failure:
        print(f"modelpar train: error: {str(failure).splitlines()[0]}", file=sys.stderr)
        return 1
    if summary is None:  # torchrun rank other than 0
        return 0
    write_pictures(summary, args.png, args.trace)
    if args.json:
        print_json(summary)
    else:
        print_summary(summary)
    return 0


def write_pictures(summary: dict, png: str | None, trace: str | None) -> None:
    """--png: the predicted step stored in the summary (the timeline of the run's one prediction,
    `planner.prediction.predict`, when there is one) above the measured last step; --trace: the
    measured timeline as Chrome trace JSON."""
    if not png and not trace:
        return
    measured = events_from_runtime(summary["timeline"])
    if trace:
        write_chrome_trace(measured, trace)
        summary["trace"] = trace
    if png:
        prediction = summary.get("prediction") or {}
        predicted = [TimelineEvent(**fields) for fields in prediction.get("timeline", ())]
        if predicted:
            title = f"{summary['model']}: predicted (cluster {prediction['cluster']}) vs measured step"
            side_by_side_png(predicted, measured, png, title=title, share_time_axis=True)
        else:  # nothing to predict with: run `modelpar profile` or pass --cluster
            gantt_png(measured, png, title=f"{summary['model']}: measured step (no prediction: "
                                           f"{prediction.get('error')})")
        summary["png"] = png


def print_summary(summary: dict) -> None:
    """Human-readable result: the plan, losses, and measured vs predicted step time (compute,
    communication, bubble), memory and throughput, with the relative error of each."""
    plan = ParallelPlan(**summary["plan"])
    console = Console()
    console.print(f"[bold]{summary['model']}[/bold] on {summary['world_size']} ranks: {plan.describe()}, "
                  f"B={plan.global_batch_size}, {summary['dtype']}, data: {summary['data']}")
    losses, norms, rates = summary["losses"], summary["grad_norms"], summary["learning_rates"]
    clip = summary["optimizer"]["clip_grad"]
    resumed = f" (resumed after step {summary['start_step']})" if summary.get("start_step") else ""
    console.print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps{resumed}; grad norm "
                  f"{norms[0]:.3g} -> {norms[-1]:.3g}{f' (clipped to {clip:g})' if clip else ''}; "
                  f"learning rate {rates[0]:.3g} -> {rates[-1]:.3g}")
    print_comparison(summary, console)
    details = summary["measurement"]
    console.print(f"MFU against {details['peak_tflops_per_device']:.3g} TFLOP/s per rank "
                  f"({details['peak_tflops_source']})")
