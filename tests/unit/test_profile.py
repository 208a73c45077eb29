"""`modelpar profile` pieces without processes: fits, the local cluster file, measured device
fields in the cost model, and the predicted-vs-measured arithmetic."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelpar.commands.cli import main
from modelpar.planner import comm, compute
from modelpar.planner.constants import KERNEL_OVERHEAD_S, NETWORK_EFFICIENCY
from modelpar.planner.cost import data_parallel_work, estimate
from modelpar.profiling.fits import (REFERENCE_LAYERS, TENSOR_COLLECTIVES_PER_LAYER, TENSOR_REFERENCE_LAYERS,
                                   TINY_REFERENCE_LAYER, build_cluster, dropped_elements, fit_bandwidth, fit_gemm,
                                   fit_layer_bandwidth, fit_layer_overheads,
                                   fit_link, fit_tensor_link, forward_backward_terms, reference_layer_spec,
                                   shared_host_profile)
from modelpar.schedules.simulate import simulate
from modelpar.planner.shared_host import simulate_shared
from modelpar.planner import prediction
from modelpar.report import comparison
from modelpar.schedules.actions import build_schedule
from modelpar.schedules.events import TimelineEvent
from modelpar.specs import CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec, ParallelPlan, SpecError, load_cluster
from modelpar.specs.cluster import DeviceSpec, SharedHostProfile
from modelpar.specs.io import load_local_cluster
from modelpar.specs.local import local_profile_path, save_local_cluster

HOST = {"cpu": "test-cpu", "cores": 2, "memory_gib": 8.0}
SMALL = MODEL_PRESETS["gpt-small-cpu"]


def cpu_device(rate_gflops: float = 50.0, **changes) -> DeviceSpec:
    fields = dict(name="cpu", peak_tflops=rate_gflops / 1e3, memory_gib=4.0, memory_bandwidth_gb_per_s=10.0,
                  matmul_efficiency=1.0, matmul_operand_bandwidth_gb_per_s=5.0, memory_bandwidth_efficiency=1.0,
                  kernel_overhead_us=8.0, attention_kernel="explicit", dropout_ns_per_element=20.0,
                  optimizer_ns_per_parameter=3.0, value_bytes=4)
    fields.update(changes)
    return DeviceSpec(**fields)


def local_cluster() -> ClusterSpec:
    profiles = [SharedHostProfile(k, cpu_device(100.0 / k), 2.0 / k, 200.0 * k) for k in (1, 2, 4, 8)]
    return build_cluster(profiles, HOST)


# --- fits ---------------------------------------------------------------------------------------


def test_gemm_fit_recovers_rate_and_operand_bandwidth():
    rate, bandwidth, per_call = 80e9, 6e9, 20e-6
    samples = []
    for m, n, k in ((128, 128, 128), (256, 768, 256), (512, 512, 512), (64, 1024, 64), (256, 128, 32)):
        flops, num_bytes, calls = forward_backward_terms(m, n, k)
        samples.append((flops, num_bytes, calls, flops / rate + num_bytes / bandwidth + calls * per_call))
    got_rate, got_bandwidth, got_per_call = fit_gemm(samples)
    assert got_rate == pytest.approx(rate, rel=1e-6)
    assert got_bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert got_per_call == pytest.approx(per_call, rel=1e-6)


def test_forward_backward_terms_are_three_products_of_equal_flops():
    flops, num_bytes, calls = forward_backward_terms(256, 768, 128)
    assert calls == 3 and flops == 3 * 2 * 256 * 768 * 128
    assert num_bytes == 4 * ((256 * 128 + 128 * 768 + 256 * 768) + (256 * 768 + 768 * 128 + 256 * 128)
                             + (128 * 256 + 256 * 768 + 128 * 768))


def test_bandwidth_fit_recovers_slope_and_intercept():
    samples = [(size, size / 12e9 + 30e-6) for size in (1e5, 1e6, 1e7)]
    bandwidth, intercept = fit_bandwidth(samples)
    assert bandwidth == pytest.approx(12e9, rel=1e-6)
    assert intercept == pytest.approx(30e-6, rel=1e-6)


def test_link_fit_uses_the_ring_formulas_of_the_planner():
    link = comm.Link(bandwidth=2e9, latency_s=300e-6, crosses_nodes=False)
    samples = []
    for size in (4096, 65536, 1 << 20, 1 << 22):
        samples.append(("all_reduce", 4, size, comm.all_reduce_time(size, 4, link)))
        samples.append(("all_gather", 4, size, comm.all_gather_time(size, 4, link)))
    bandwidth, latency = fit_link(samples)
    assert bandwidth == pytest.approx(2e9, rel=1e-6)
    assert latency == pytest.approx(300e-6, rel=1e-6)


def test_noisy_gemm_timings_that_do_not_grow_are_a_spec_error():
    samples = [(*forward_backward_terms(n, n, n), 1e-3) for n in (64, 128, 256)]
    samples += [(*forward_backward_terms(512, 512, 512), 1e-4)]
    with pytest.raises(SpecError, match="quieter machine"):
        fit_gemm(samples)


def test_shared_host_profile_takes_medians_over_ranks():
    def rank(scale):
        gemm = [(*forward_backward_terms(n, n, n), scale * forward_backward_terms(n, n, n)[0] / 50e9)
                for n in (64, 128, 256, 512)]
        return {"device": {"threads": 1, "op_overhead_s": 5e-6, "gemm": gemm,
                           "elementwise": [(size, scale * size / 10e9) for size in (1e5, 1e6, 1e7)],
                           "dropout_ns_per_element": 20.0 * scale, "optimizer_ns_per_parameter": 2.0,
                           # faster than their GEMMs (no bandwidth fit); dropout adds 30 ns per dropped value
                           "reference_layers": [(1e-9, 1e-9 + 30e-9 * dropped_elements(h, a, s, b))
                                                for h, a, _, s, b in REFERENCE_LAYERS]},
                "link": [("all_reduce", 2, s, s / 1e9 + 2e-4) for s in (4096, 1 << 16, 1 << 20)]
                + [("all_gather", 2, s, s / 2e9 + 1e-4) for s in (4096, 1 << 16, 1 << 20)]
                + [("p2p", 2, 4096, 1e-5)]}

    profile, summary = shared_host_profile(2, [rank(1.0), rank(1.0), rank(3.0)], HOST)
    device = profile.device
    assert device.peak_tflops == pytest.approx(0.05, rel=1e-3)
    assert device.memory_bandwidth_gb_per_s == pytest.approx(10.0, rel=1e-3)
    assert device.dropout_ns_per_element == pytest.approx(30.0)  # inside the layers, not the benchmark's 20
    assert device.value_bytes == 4 and device.attention_kernel == "explicit"
    assert device.memory_gib == pytest.approx(4.0)  # the host's RAM shared by 2 ranks
    assert profile.bandwidth_gb_per_s == pytest.approx(1.0, rel=1e-3)  # p2p is not in the fit
    assert profile.latency_us == pytest.approx(100.0, rel=1e-3)
    assert summary["ranks"] == 2


def test_layer_bandwidth_fit_recovers_the_bandwidth_that_made_the_layer_times():
    device = cpu_device(memory_bandwidth_gb_per_s=30.0)
    truth = replace(device, memory_bandwidth_gb_per_s=7.0)
    times = []
    for hidden, heads, mlp, seq, batch in REFERENCE_LAYERS:
        layer = compute.layer_compute(reference_layer_spec(hidden, heads, mlp, seq), truth, batch, 1, False, "none")
        times.append(layer.forward_s + layer.backward_s)
    assert fit_layer_bandwidth(device, times) == pytest.approx(7e9, rel=1e-6)
    assert fit_layer_bandwidth(device, [1e-9] * len(times)) is None


def test_tensor_link_fit_recovers_the_link_that_made_the_tensor_parallel_layer_times():
    device = cpu_device()
    bandwidth, latency, ranks = 0.4e9, 900e-6, 2
    link = comm.Link(bandwidth, latency, False)
    times = []
    for hidden, heads, mlp, seq, batch in TENSOR_REFERENCE_LAYERS:
        layer = compute.layer_compute(reference_layer_spec(hidden, heads, mlp, seq), device, batch, ranks, False, "none")
        activation = batch * seq * hidden * compute.value_bytes(device)
        times.append(layer.forward_s + layer.backward_s
                     + TENSOR_COLLECTIVES_PER_LAYER * comm.all_reduce_time(activation, ranks, link))
    fitted = fit_tensor_link(device, ranks, times, bandwidth)
    assert fitted[0] == pytest.approx(bandwidth, rel=1e-6) and fitted[1] == pytest.approx(latency, rel=1e-6)
    assert fit_tensor_link(device, ranks, [1e-9] * len(times), bandwidth) is None  # nothing left for them
    assert fit_tensor_link(device, 1, times, bandwidth) is None


def test_layer_overheads_are_what_a_tiny_layer_takes_beyond_its_kernels():
    device = cpu_device()
    hidden, heads, mlp, seq, batch = TINY_REFERENCE_LAYER
    kernels = compute.layer_compute(reference_layer_spec(hidden, heads, mlp, seq), device, batch, 1, False, "none")
    per_element = dropped_elements(hidden, heads, seq, batch) * device.dropout_ns_per_element * 1e-9
    forward, backward, dropout_call = kernels.forward_s + 250e-6, kernels.backward_s + 300e-6, 600e-6
    fitted = fit_layer_overheads(device, (forward, forward + backward, forward + backward + per_element + dropout_call))
    assert fitted.layer_forward_overhead_us == pytest.approx(250.0)
    assert fitted.layer_backward_overhead_us == pytest.approx(300.0)
    assert fitted.dropout_call_overhead_us == pytest.approx(600.0)
    assert fit_layer_overheads(device, None) is device
    # the cost model charges them per layer: forward (+ the dropout calls when the model drops out), backward
    spec = MODEL_PRESETS["gpt-tiny"]
    plain = compute.layer_compute(spec, device, 2, 1, False, "none")
    charged = compute.layer_compute(spec, fitted, 2, 1, False, "full")
    assert charged.forward_s - plain.forward_s == pytest.approx(850e-6)
    assert charged.backward_s - plain.backward_s == pytest.approx(300e-6)
    assert charged.recompute_s == pytest.approx(charged.forward_s)


def test_profiled_tensor_link_prices_tensor_parallel_collectives_only():
    profiles = tuple(SharedHostProfile(ranks=k, device=cpu_device(), bandwidth_gb_per_s=2.0, latency_us=100.0,
                                       tensor_bandwidth_gb_per_s=0.5, tensor_latency_us=800.0) for k in (1, 2))
    cluster = build_cluster(list(profiles), {"cpu": "test", "cores": 2, "memory_gib": 8.0})
    seen = cluster.for_world_size(2)
    assert seen.tensor_link == (0.5, 800.0)
    assert comm.tensor_link(seen, 2).bandwidth == pytest.approx(0.5e9)
    assert comm.tensor_link(seen, 2).latency_s == pytest.approx(800e-6)
    assert comm.group_link(seen, 2, 1).bandwidth == pytest.approx(2e9)  # data parallel keeps the isolated link
    assert load_cluster(json_round_trip(cluster)).for_world_size(2).tensor_link == (0.5, 800.0)
    with pytest.raises(SpecError, match="tensor_latency_us"):
        SharedHostProfile(ranks=2, device=cpu_device(), bandwidth_gb_per_s=2.0, latency_us=100.0,
                          tensor_bandwidth_gb_per_s=0.5)


def json_round_trip(cluster: ClusterSpec) -> dict:
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(cluster)))


# --- the local cluster file ----------------------------------------------------------------------


def test_local_cluster_round_trips_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPAR_CACHE", str(tmp_path))
    cluster = local_cluster()
    path = save_local_cluster(cluster)
    assert path == tmp_path / "local_cluster.json" == local_profile_path()
    assert load_local_cluster() == cluster
    assert load_cluster("local") == cluster
    assert load_cluster(str(path)) == cluster  # plain ClusterSpec JSON


def test_missing_local_profile_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELPAR_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SpecError, match=r"no local profile: run `modelpar profile` first"):
        load_cluster("local")
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local", "--devices", "2"]) == 2
    err = capsys.readouterr().err
    assert "no local profile" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed JSON"),
    ('{"name": "local"}', "missing required key"),
    ('{"name": "x", "device": {"name": "d", "peak_tflops": 1, "memory_gib": 1, "memory_bandwidth_gb_per_s": 1,'
     ' "attention_kernel": "flash"}, "devices_per_node": 1, "intra_node_bandwidth_gb_per_s": 1,'
     ' "inter_node_bandwidth_gb_per_s": 1}', "attention_kernel"),
])
def test_bad_local_profile_is_a_one_line_spec_error(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.setenv("MODELPAR_CACHE", str(tmp_path))
    (tmp_path / "local_cluster.json").write_text(content)
    with pytest.raises(SpecError, match=message):
        load_local_cluster()
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local", "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_for_world_size_picks_the_smallest_profile_that_holds_the_ranks():
    cluster = replace(local_cluster(), host_cores=None)  # no processor sharing: the measured devices
    assert cluster.for_world_size(1).device.peak_tflops == pytest.approx(0.1)
    assert cluster.for_world_size(3).device.peak_tflops == pytest.approx(0.1 / 4)
    assert cluster.for_world_size(4).intra_node_latency_us == pytest.approx(800.0)
    assert cluster.for_world_size(16).device.peak_tflops == pytest.approx(0.1 / 8)  # beyond: the largest
    preset = CLUSTER_PRESETS["dgx-a100-80gb"]
    assert preset.for_world_size(64) is preset and not preset.shares_cores(64)


def test_more_ranks_than_cores_use_the_measured_device_scaled_to_one_rank_per_core():
    cluster = local_cluster()  # 2 cores, ideal sharing: the k = 4 device at 4/2 is the k = 2 one
    four = cluster.for_world_size(4)
    assert four.device.peak_tflops == pytest.approx(0.1 / 2)
    assert four.intra_node_latency_us == pytest.approx(800.0)  # collectives among 4 sharing ranks
    assert four.shares_cores(4) and not cluster.for_world_size(2).shares_cores(2)
    # 4 ranks on 2 cores that lose 10% to caches and context switches keep that loss
    lossy = SharedHostProfile(4, cpu_device(100.0 / 4 * 0.9, kernel_overhead_us=8.0 * 2 / 0.9,
                                            dropout_ns_per_element=20.0 * 2 / 0.9), 0.5, 800.0)
    profiles = tuple(lossy if profile.ranks == 4 else profile for profile in cluster.shared_host)
    device = replace(cluster, shared_host=profiles).for_world_size(4).device
    assert device.peak_tflops == pytest.approx(0.1 / 2 * 0.9)
    assert device.kernel_overhead_us == pytest.approx(8.0 / 0.9)
    assert device.dropout_ns_per_element == pytest.approx(20.0 / 0.9)
    assert device.memory_bandwidth_gb_per_s == pytest.approx(10.0 * 2)  # measured at 4, scaled by 4/2


def test_duplicate_rank_counts_are_rejected():
    profile = SharedHostProfile(2, cpu_device(), 1.0, 10.0)
    with pytest.raises(SpecError, match="each count at most once"):
        replace(local_cluster(), shared_host=(profile, profile))


# --- measured fields in the cost model -------------------------------------------------------------


def test_measured_device_fields_replace_the_global_constants():
    device = cpu_device(kernel_overhead_us=40.0)
    assert compute.kernel_overhead_s(device) == pytest.approx(40e-6)
    assert compute.kernel_overhead_s(CLUSTER_PRESETS["dgx-h100"].device) == KERNEL_OVERHEAD_S
    # FLOP term at the measured rate, operands at the measured packing rate, fp32 operands
    expected = 2 * 64**3 / 50e9 + 4 * 3 * 64**2 / 5e9 + 40e-6
    assert compute.gemm_time(device, 64, 64, 64) == pytest.approx(expected, rel=1e-12)
    assert comm.network_efficiency(local_cluster()) == 1.0
    assert comm.network_efficiency(CLUSTER_PRESETS["dgx-h100"]) == NETWORK_EFFICIENCY


def test_explicit_attention_costs_the_full_score_matrix_and_dropout():
    fused = cpu_device(attention_kernel="fused", dropout_ns_per_element=None)
    explicit = cpu_device(dropout_ns_per_element=None)
    no_dropout = replace(SMALL, dropout=0.0)
    fused_fwd = compute.layer_compute(no_dropout, fused, 2, 1, False, "none").attention_forward_s
    explicit_fwd = compute.layer_compute(no_dropout, explicit, 2, 1, False, "none").attention_forward_s
    assert explicit_fwd > 2 * fused_fwd  # no causal skipping, and the scores go through memory
    keyed = cpu_device(dropout_ns_per_element=30.0)
    with_dropout = compute.layer_compute(SMALL, keyed, 2, 1, False, "none")
    without = compute.layer_compute(SMALL, replace(keyed, dropout_ns_per_element=0.0), 2, 1, False, "none")
    b, s, h, a = 2, SMALL.seq_length, SMALL.hidden_size, SMALL.num_attention_heads
    dropped = b * a * s * s + 2 * b * s * h  # probabilities and the two residual branches
    assert with_dropout.forward_s - without.forward_s == pytest.approx(dropped * 30e-9, rel=1e-9)


def test_fp32_device_doubles_the_bytes_of_gradient_reduction():
    plan = ParallelPlan(1, 1, 4, 1, 1, 1, 8, False, "none", 0, "1f1b")
    cluster = local_cluster()
    fp32 = estimate(SMALL, cluster, 4, plan).breakdown["data_parallel_comm_s"]
    sixteen_bit = replace(cluster, shared_host=tuple(replace(p, device=replace(p.device, value_bytes=2))
                                                     for p in cluster.shared_host))
    assert fp32 > 1.5 * estimate(SMALL, sixteen_bit, 4, plan).breakdown["data_parallel_comm_s"]


def test_estimate_on_a_shared_host_uses_the_profile_of_its_rank_count():
    cluster = local_cluster()
    two = ParallelPlan(1, 1, 2, 1, 1, 2, 4, False, "none", 0, "1f1b")
    alone = replace(cluster, device=cluster.for_world_size(2).device, shared_host=())
    assert estimate(SMALL, cluster, 2, two).breakdown["compute_s"] == pytest.approx(
        estimate(SMALL, alone, 2, two).breakdown["compute_s"])


# --- predicted vs measured ---------------------------------------------------------------------------


def test_prediction_has_the_six_keys_and_adds_up():
    plan = ParallelPlan(2, 2, 1, 1, 1, 2, 8, True, "none", 0, "1f1b")
    predicted = prediction.predict(SMALL, plan, local_cluster(), "fp32")
    for key in prediction.COMPARED_KEYS:
        assert predicted[key] > 0, key
    total = predicted["compute_s"] + predicted["communication_s"] + predicted["bubble_s"]
    assert total == pytest.approx(predicted["step_time_s"], rel=1e-9)
    assert predicted["activation_bytes_per_layer"] > 0


def test_bf16_prediction_counts_the_runtimes_fp32_main_gradients():
    plan = ParallelPlan(2, 2, 1, 1, 1, 2, 8, True, "none", 0, "1f1b")
    memory = prediction.predict(SMALL, plan, local_cluster(), "bf16")["memory"]
    assert memory["gradients"] == 2 * memory["parameters"]  # bf16 weights, fp32 main_grad: 18 bytes/parameter


def spans(*rows):
    """TimelineEvents of rows (start, end, kind, name)."""
    return [TimelineEvent(0, name, kind, start, end) for start, end, kind, name in rows]


def test_collective_waits_split_a_late_peer_from_the_transfer():
    # rank 0 enters the all-reduce at t=1.0, rank 1 at t=3.0; both leave at t=3.5
    label = "all_reduce 0,1 #1"
    events = [spans((0.0, 1.0, "forward", "F"), (1.0, 3.5, "collective", label)),
              spans((0.0, 3.0, "forward", "F"), (3.0, 3.5, "collective", label))]
    waits = comparison.collective_waits(events)
    assert waits[0] == {1: pytest.approx(2.0)} and waits[1] == {1: pytest.approx(0.0)}
    early = comparison.step_breakdown(events[0], 3.6, waits[0])
    assert early == pytest.approx({"compute_s": 1.0, "communication_s": 0.5, "bubble_s": 2.1})


def test_an_asynchronous_collective_arrives_when_launched():
    # both launch, compute, then wait: rank 1 launched at 2.0, so rank 0's wait from 1.5 idles 0.5
    label = "all_gather 0,1 #1"
    events = [spans((0.2, 0.2, "collective_launch", label), (1.5, 2.6, "collective", label)),
              spans((2.0, 2.0, "collective_launch", label), (2.5, 2.6, "collective", label))]
    waits = comparison.collective_waits(events)
    assert waits[0] == {1: pytest.approx(0.5)} and waits[1] == {1: pytest.approx(0.0)}


def test_collectives_inside_compute_move_to_communication():
    events = spans((0.0, 1.0, "forward", "F"), (0.2, 0.3, "collective", "all_reduce 0,1 #1"),
                   (1.0, 1.2, "recv", "B"), (1.2, 2.0, "backward", "B"), (2.0, 2.1, "send", "B"),
                   (2.1, 2.5, "grad_sync", "step"), (2.2, 2.4, "collective", "all_reduce 0,1 #2"),
                   (2.5, 2.6, "collective", "all_reduce 0,1 #3"), (2.6, 2.9, "optimizer", "optimizer"))
    waits = {5: 0.0, 6: 0.15, 7: 0.0}
    got = comparison.step_breakdown(events, 3.0, waits)
    assert got["compute_s"] == pytest.approx(1.0 - 0.1 + 0.8 + 0.3)
    assert got["communication_s"] == pytest.approx(0.1 + 0.1 + (0.4 - 0.15) + 0.1)
    assert got["compute_s"] + got["communication_s"] + got["bubble_s"] == pytest.approx(3.0)


def test_measured_times_take_the_busiest_rank_and_errors_are_ratios():
    ranks = [{"step_time_s": 1.0, "compute_s": 0.6, "communication_s": 0.1},
             {"step_time_s": 1.1, "compute_s": 0.8, "communication_s": 0.05}]
    measured = comparison.measured_times(ranks)
    assert measured == pytest.approx({"step_time_s": 1.1, "compute_s": 0.8, "communication_s": 0.05,
                                      "bubble_s": 0.25})
    errors = comparison.relative_errors({"step_time_s": 1.21, "compute_s": 0.4, "bubble_s": 0.0},
                                        {**measured, "communication_s": 0.0})
    assert errors["step_time_s"] == pytest.approx(0.1) and errors["compute_s"] == pytest.approx(-0.5)
    assert errors["communication_s"] is None and errors["peak_memory_bytes"] is None


def test_profile_arguments_reject_bad_rank_lists(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--ranks", "two"])
    assert "rank counts" in capsys.readouterr().err


# --- processor sharing ---------------------------------------------------------------------------------


def _unit_step(schedule, p, m, replicas, cores, v=1):
    actions = build_schedule(schedule, p, m, v)
    return simulate_shared(actions, lambda r, a: 1.0 if a.kind == "F" else 2.0, lambda r, a: 0.0, 0.0,
                           replicas, cores)


def test_sharing_without_pipeline_slows_every_rank_by_ranks_over_cores():
    shared = _unit_step("1f1b", 1, 4, replicas=4, cores=2)
    assert shared.makespan == pytest.approx(2 * 4 * 3.0)
    assert shared.compute_wall[0] == pytest.approx(shared.makespan)


@pytest.mark.parametrize("schedule, p, m, v", [("1f1b", 2, 4, 1), ("gpipe", 2, 3, 1), ("interleaved", 2, 4, 2)])
def test_no_sharing_when_cores_suffice_matches_the_list_scheduler(schedule, p, m, v):
    shared = _unit_step(schedule, p, m, replicas=1, cores=p, v=v)
    plain = simulate(build_schedule(schedule, p, m, v), 1.0, 2.0)
    assert shared.makespan == pytest.approx(plain.makespan)


def test_sharing_shrinks_the_pipeline_bubble():
    p, m, cores = 4, 8, 2
    shared = _unit_step("1f1b", p, m, replicas=1, cores=cores)
    unshared = simulate(build_schedule("1f1b", p, m), 1.0, 2.0).makespan
    total_work = p * m * 3.0
    assert total_work / cores <= shared.makespan < p / cores * unshared  # the fill and drain run faster
    assert shared.makespan >= unshared


def test_estimate_of_an_oversubscribed_pipeline_uses_processor_sharing():
    plan = ParallelPlan(1, 4, 1, 1, 1, 1, 8, False, "none", 0, "1f1b")
    cluster = local_cluster()
    shared = estimate(SMALL, cluster, 4, plan)
    naive = estimate(SMALL, replace(cluster, host_cores=None), 4, plan)  # every rank at the k = 4 rate
    assert shared.step_time_s < naive.step_time_s
    parts = shared.breakdown
    assert parts["compute_s"] + parts["tensor_parallel_comm_s"] + parts["bubble_s"] + parts["pipeline_p2p_s"] \
        + parts["data_parallel_comm_s"] + parts["optimizer_s"] == pytest.approx(shared.step_time_s)


def test_shared_host_data_parallel_communication_is_not_overlapped():
    plan = ParallelPlan(1, 1, 2, 1, 1, 2, 4, False, "none", 0, "1f1b")
    cluster = local_cluster()
    parts = estimate(SMALL, cluster, 2, plan).breakdown
    assert parts["overlapped_comm_s"] == 0.0
    reduce_s, _, _ = data_parallel_work(SMALL, cluster.for_world_size(2), 1, 1, 2, 0)
    assert parts["data_parallel_comm_s"] == pytest.approx(reduce_s)
