"""The seed review's table (Sec. 4.1/4.2), with the primary papers' numbers where the seed slips.

For each seed model on its published hardware and device count: `modelpar plan` returns the
published configuration or one predicted faster, and the published configuration's predicted
MFU is compared with the published figure (target: within 5 points). The table is printed
(`pytest -s tests/unit/test_seed_table.py`, or `-rA`); the rows that miss the target are strict xfails,
so they turn red the day the model gets them right.

Published configurations and figures (model FLOPs utilisation, Korthikanti et al. 2022 eq. 7):
- megatron-8.3b: Shoeybi et al. 2019 Sec. 5.1: 512 V100 (32 DGX-2H), 8-way tensor x 64-way
  data, batch 512; 15.1 PFLOP/s = 29.5 TFLOP/s per GPU = 22.7% of 130 TFLOP/s (the seed's 30%
  is the single-GPU baseline).
- megatron-530b: the seed's row (t8 p35 d12, batch 1920) is MT-NLG on 420 DGX A100 nodes (Smith
  et al. 2022 Sec. 2.4): 113 TFLOP/s per GPU counting the recomputed forward = 27.2% MFU (the
  seed's 36% is that HFU).
- megatron-1t: Korthikanti et al. 2022 Table 5: 512 A100, t8 p64, batch 512, sequence parallel +
  selective recompute, 56.3% MFU.
- gopher-280b: Rae et al. 2021 / PaLM Sec. 4: 4096 TPU v3 in 4 pods, model parallel within a pod
  and pipelining across pods (tensor degree not published: 8 as in the seed), batch 3M tokens
  = 1536 sequences; 32.5% MFU (PaLM Table 3). The seed's "pipeline 4 x data 1024" is 4x too many.
- palm-540b: Chowdhery et al. 2022 Sec. 4/5: 6144 TPU v4 in 2 pods, 12-way model parallel x 512
  data (parameters sharded over data too: ZeRO-3-like), no pipeline (the seed's "pipeline 0"),
  batch 2048, rematerialisation; 46.2% MFU.
"""

from __future__ import annotations

import pytest

from modelpar.planner.cost import estimate
from modelpar.planner.search import search
from modelpar.specs import ParallelPlan, load_cluster, load_model

SEED_TABLE = [
    # model, cluster, devices, published plan, published MFU, reason when the model misses it
    ("megatron-8.3b", "dgx-2h-v100", 512, ParallelPlan(8, 1, 64, 1, 1, 8, 512, False, "full", 0, "1f1b"), 0.227, None),
    ("megatron-530b", "dgx-a100-80gb", 3360, ParallelPlan(8, 35, 12, 1, 1, 1, 1920, False, "full", 0, "1f1b"), 0.272,
     "MT-NLG ran 30% below Megatron's own 530B runs on the same hardware (see validation: mtnlg)"),
    ("megatron-1t", "dgx-a100-80gb", 512, ParallelPlan(8, 64, 1, 1, 1, 1, 512, True, "selective", 0, "1f1b"), 0.563, None),
    ("gopher-280b", "tpu-v3", 4096, ParallelPlan(8, 4, 128, 1, 1, 1, 1536, False, "full", 1, "1f1b"), 0.325, None),
    ("palm-540b", "tpu-v4", 6144, ParallelPlan(12, 1, 512, 1, 1, 1, 2048, False, "full", 3, "1f1b"), 0.462,
     "PaLM's parallel attention+MLP layers and XLA's overlapped collectives are not modelled"),
]


def _row(model_name, cluster_name, devices, published):
    model, cluster = load_model(model_name), load_cluster(cluster_name)
    predicted = estimate(model, cluster, devices, published)
    best = search(model, cluster, devices, ParallelPlan(global_batch_size=published.global_batch_size), top=1).plans[0]
    return predicted, best


def test_print_seed_table():
    lines = [f"{'model':<15}{'devices':>8}  {'published plan':<32}{'pub. MFU':>9}{'pred. MFU':>10}  best plan (pred. MFU)"]
    for model_name, cluster_name, devices, published, mfu, _ in SEED_TABLE:
        predicted, best = _row(model_name, cluster_name, devices, published)
        p, b = published, best.plan
        lines.append(
            f"{model_name:<15}{devices:>8}  t{p.tensor_parallel} p{p.pipeline_parallel} d{p.data_parallel} b{p.micro_batch_size} "
            f"{p.recompute:<9}{'SP' if p.sequence_parallel else '':<3}{mfu:>9.1%}{predicted.mfu:>10.1%}  "
            f"t{b.tensor_parallel} p{b.pipeline_parallel} d{b.data_parallel} v{b.virtual_stages} b{b.micro_batch_size} "
            f"{b.schedule} {b.recompute} SP={b.sequence_parallel} ZeRO-{b.zero_stage} ({best.mfu:.1%})"
        )
    print("\n" + "\n".join(lines))  # captured: shown with `pytest -s` or `-rA`, silent under `-q`


@pytest.mark.parametrize("row", SEED_TABLE, ids=[r[0] for r in SEED_TABLE])
def test_plan_returns_published_configuration_or_faster(row):
    model_name, cluster_name, devices, published, _, _ = row
    predicted, best = _row(model_name, cluster_name, devices, published)
    assert best.step_time_s <= predicted.step_time_s * (1 + 1e-9)


@pytest.mark.parametrize(
    "row",
    [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=r[5])) if r[5] else r for r in SEED_TABLE],
    ids=[r[0] for r in SEED_TABLE],
)
def test_published_configuration_mfu_within_5_points(row):
    model_name, cluster_name, devices, published, published_mfu, _ = row
    predicted, _ = _row(model_name, cluster_name, devices, published)
    assert abs(predicted.mfu - published_mfu) <= 0.05, f"predicted {predicted.mfu:.1%} vs published {published_mfu:.1%}"
