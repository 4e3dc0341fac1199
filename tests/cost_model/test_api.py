"""The public API beyond training steps: plain graphs, TrainingGraph + plan, unknown ops, plot, report."""
from __future__ import annotations

import json

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from memgraph import cost_model
from memgraph.capture import capture
from memgraph.cost_model.plot import align_measured
from memgraph.cost_model.tracker import GraphRunner, MemoryTracker

from tests.helpers import NO_REWRITES


def _forward_only(x, w):
    h = torch.relu(x @ w)
    y = h.t().contiguous()
    return (y * 2).sum(dim=0), h[:2]


def test_plain_forward_graph_matches_tracker():
    x, w = torch.randn(32, 48), torch.randn(48, 40)
    gm = make_fx(_forward_only, tracing_mode="fake")(x, w)
    estimate = cost_model.estimate(gm, [x, w])
    tracker = MemoryTracker()
    samples = []
    with tracker, torch.no_grad():
        tracker.track([x, w])
        outputs = GraphRunner(gm, "forward", tracker.mark, samples).run(x, w)
    assert estimate.peak_bytes_hint == tracker.peak_bytes
    assert estimate.backward_start is None and estimate.peak_phase == "forward"
    # The outputs (one a view of h) are alive at the end: h's storage and the summed row.
    assert int(estimate.live[-1].sum()) == tracker.current_bytes
    del outputs


def test_graph_without_fake_values_is_propagated_and_unknown_ops_reported():
    class Block(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x).mean(dim=-1).clone()

    gm = fx.symbolic_trace(Block())  # torch-level: a call_method and a Python function, no fake values
    estimate = cost_model.estimate(gm, [torch.randn(16, 64)])
    assert estimate.peak_bytes_hint > 16 * 64 * 4
    assert estimate.unknown_ops  # gelu (a Python function) and .mean/.clone (call_method) are not aten ops
    assert all(isinstance(reason, str) for reason in estimate.unknown_ops.values())


def test_training_graph_with_and_without_plan(llama, make_ids):
    ids = make_ids(16)
    (captured,) = capture(llama, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    default = cost_model.estimate(captured.graph)
    planned = cost_model.estimate(captured.graph, plan=captured.plan)
    partitioned = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw)
    assert default.peak_bytes_hint == planned.peak_bytes_hint == partitioned.peak_bytes_hint
    assert isinstance(planned.peak_bytes, int)
    point = planned.timeline[planned.peak_index]
    assert point.during_bytes == planned.peak_bytes_hint and point.node == planned.peak_node
    assert sum(planned.breakdown.values()) == planned.peak_bytes_hint
    # A tiny full fine-tune peaks at the end of backward, all gradients alive; activations peak earlier.
    assert planned.breakdown["weights"] > 0 and planned.breakdown["grads"] > 0
    saved_column = planned.live[:, cost_model.CATEGORIES.index("saved")]
    assert saved_column.max() > 0 and saved_column[-1] == 0
    boundary = planned.backward_start
    assert saved_column[boundary - 1] == saved_column.max()  # all activations are alive when backward starts
    biggest = planned.live_at_peak(top=3)
    assert len(biggest) == 3 and biggest[0]["bytes"] >= biggest[-1]["bytes"]


def test_costs_answer_per_node_questions(llama, make_ids):
    ids = make_ids(16)
    (captured,) = capture(llama, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    costs = captured.costs
    assert len(costs.names) == len(costs.weight) == len(costs.seconds) == len(costs.kinds) == len(costs.phase)
    # Saving every forward value backward reads directly recomputes nothing.
    assert costs.recomputed(costs.save_all) == set() and costs.recompute_seconds(costs.save_all) == 0
    assert costs.save_all <= costs.forward_set  # forward values (and primals) only
    assert set(costs.phase) == {"input", "forward", "backward"}
    everything = costs.simulate(costs.save_all)
    assert everything.peak_bytes_hint > 0
    try:
        costs.simulate(set())  # nothing saved: backward cannot run
    except cost_model.InvalidSavedSet as error:
        assert "cannot compute" in str(error)
    else:
        raise AssertionError("an empty saved set must be rejected")


def test_plot_with_measured_overlay(tmp_path, llama, make_ids):
    from memgraph.cost_model.tracker import run_step

    ids = make_ids(16)
    (captured,) = capture(llama, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    estimate = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw)
    measured = run_step(captured.fw, captured.bw, captured.primals, captured.graph.num_fwd_outputs,
                        tracker=MemoryTracker())
    aligned = align_measured(estimate, measured.per_node)
    assert len(aligned) == len(estimate.names) and max(aligned) == measured.peak_bytes
    path = estimate.plot(str(tmp_path / "timeline.png"), measured=aligned)
    assert (tmp_path / "timeline.png").stat().st_size > 10_000 and path.endswith(".png")


def test_write_report(tmp_path, llama, make_ids):
    from memgraph.options import Options
    from memgraph.pipeline import GraphRecord
    from memgraph.report import write_report

    ids = make_ids(16)
    (captured,) = capture(llama, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    estimate = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw)
    captured.plan.peak_bytes = estimate.peak_bytes_hint
    record = GraphRecord(7, Options(solver="none", codegen="eager"), ["attention"], captured.plan, estimate)
    json_path, png_path = write_report(record, str(tmp_path / "run"))
    assert json_path.name == "run.graph7.json" and png_path.name == "run.graph7.png" and png_path.exists()
    report = json.loads(json_path.read_text())
    assert report["options"]["solver"] == "none" and report["rewrites"] == ["attention"]
    assert report["plan"]["peak_bytes"] == estimate.peak_bytes_hint
    summary = report["estimate"]
    assert summary["peak_bytes"] == estimate.peak_bytes_hint and summary["peak_node"] == estimate.peak_node
    assert summary["peak_phase"] in ("forward", "backward") and summary["unknown_ops"] == {}
    assert sum(summary["breakdown_bytes"].values()) == estimate.peak_bytes_hint
