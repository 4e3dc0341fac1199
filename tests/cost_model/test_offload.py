"""Offload as the planner's third choice: valid plans, graphs that give eager's gradients, one timeline."""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from memgraph import cost_model
from memgraph.capture import capture
from memgraph.cost_model.solvers import get
from memgraph.cost_model.solvers.offload import leanest_saved, offload_until_fits
from memgraph.cost_model.transfers import wait_offload_name, wait_reload_name
from memgraph.errors import InfeasibleBudgetError, MemgraphError
from memgraph.options import resolve_options
from memgraph.passes.partition import partition
from memgraph.pipeline import compiled_graphs

from .conftest import token_ids

OFFLOAD_ON = {"offload": "on", "rewrites": False, "codegen": "eager"}  # tests override codegen where it matters
SEQ = 512  # long enough for layer inputs, not the weights or the logits, to set the peak


def four_layer_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(config).train()


@pytest.fixture(scope="module")
def captured():
    ids = token_ids(SEQ)
    (graph,) = capture(four_layer_llama(), options=OFFLOAD_ON, solvers=("offload-layers", "checkpoint"),
                       input_ids=ids, labels=ids)
    return graph


def assert_transfers_are_ordered(plan, fw, bw, num_fwd_outputs: int, *, reload_op: str = "reload",
                                 wait_op: str = "wait_transfer") -> None:
    """Every offloaded value leaves forward as its host copy (or slot token), and backward reads it only after
    its reload."""
    fw_outputs = [n.name for n in fw.graph.find_nodes(op="output")[0].args[0][num_fwd_outputs:]]
    bw_order = {n.name: k for k, n in enumerate(bw.graph.nodes)}
    bw_nodes = {n.name: n for n in bw.graph.nodes}
    for value in plan.offloaded:
        assert value not in fw_outputs and wait_offload_name(value) in fw_outputs
        host = bw_nodes[wait_offload_name(value)]
        assert host.op == "placeholder" and value not in bw_nodes
        assert {u.target for u in host.users} == {getattr(torch.ops.memgraph, reload_op).default,
                                                  getattr(torch.ops.memgraph, wait_op).default}
        wait = bw_nodes[wait_reload_name(value)]
        reload = wait.args[0]
        assert bw_order[reload.name] < bw_order[wait.name] < min(bw_order[u.name] for u in wait.users)


def test_offload_layers_offloads_each_layer_input(captured):
    plan = captured.partitions["offload-layers"].plan
    checkpoint = captured.partitions["checkpoint"].plan
    assert plan.saved == checkpoint.saved and plan.recomputed == checkpoint.recomputed
    assert len(plan.offloaded) >= 3  # one hidden state per layer (the first may be the embedding)
    assert plan.host_bytes == sum(int(captured.costs.weight[i]) for i in captured.costs.indices(plan.offloaded))
    assert plan.peak_bytes < checkpoint.peak_bytes  # the layer inputs no longer wait on the device
    part = captured.partitions["offload-layers"]
    assert_transfers_are_ordered(plan, part.fw, part.bw, part.graph.num_fwd_outputs)


def test_captured_transfers_hand_backward_a_device_token(captured):
    """For CUDA graphs, forward hands backward no host tensor: each offloaded value leaves as a token of its shape
    and dtype over one element of device storage, and backward reloads it from the token's slot."""
    part = captured.partitions["offload-layers"]
    fw, bw = partition(part.graph.private_copy(), part.plan, captured=True)
    assert_transfers_are_ordered(part.plan, fw, bw, part.graph.num_fwd_outputs, reload_op="reload_from_slot",
                                 wait_op="wait_captured_transfer")
    handed = {n.name: n for n in fw.graph.find_nodes(op="output")[0].args[0][part.graph.num_fwd_outputs:]}
    for value in part.plan.offloaded:
        token, original = handed[wait_offload_name(value)].meta["val"], part.graph.node(value).meta["val"]
        assert token.device == original.device and token.dtype == original.dtype
        assert token.shape == original.shape and token.untyped_storage().nbytes() == token.element_size()
        assert handed[wait_offload_name(value)].args[0].target is torch.ops.memgraph.offload_to_slot.default
    ops = {n.target for g in (fw, bw) for n in g.graph.nodes}
    assert not ops & {torch.ops.memgraph.offload.default, torch.ops.memgraph.reload.default,
                      torch.ops.memgraph.wait_transfer.default}


def test_each_offload_holds_its_own_slot_until_its_reload():
    """Two copies of one value may wait at once (two forwards before their backwards); a slot goes back to the
    free list at its reload and is reused by the next offload that fits."""
    from memgraph.kernels import offload as ops

    ops.release_host_buffers()
    first, second = torch.randn(3, 5), torch.randn(3, 5)
    tokens = [ops.wait_captured_transfer(ops.offload_to_slot(v), v) for v in (first, second)]
    held = {ops._held_slots[t.data_ptr()].data_ptr() for t in tokens}
    assert len(held) == 2 and all(t.untyped_storage().nbytes() == t.element_size() for t in tokens)
    for token, value in zip(tokens, (first, second)):
        assert torch.equal(ops.wait_captured_transfer(ops.reload_from_slot(token), token), value)
    assert {b.data_ptr() for b in ops._free_slots} == held and not ops._held_slots
    smaller = torch.randn(2, 3)
    token = ops.offload_to_slot(smaller)
    assert ops._held_slots[token.data_ptr()].data_ptr() in held  # reused: it fits
    assert torch.equal(ops.reload_from_slot(token), smaller)
    with pytest.raises(RuntimeError, match="no offload_to_slot holds"):
        ops.reload_from_slot(token)  # reloaded once already


def test_two_forwards_before_their_backwards_with_captured_transfers(monkeypatch):
    """A loss over two forwards of one compiled model (DPO-style): each forward's offloaded values wait in their
    own slots, so each backward reloads its own forward's values (eager's gradients)."""
    model = four_layer_llama()
    reference = copy.deepcopy(model)
    a, b = token_ids(256), token_ids(256).flip(-1)
    (reference(input_ids=a, labels=a).loss + reference(input_ids=b, labels=b).loss).backward()
    torch._dynamo.reset()
    options = {**OFFLOAD_ON, "solver": "offload-layers", "codegen": "inductor", "cache": False}
    compiled = torch.compile(model, backend="memgraph", options=options)
    as_if_replayed_from_cuda_graphs(monkeypatch)
    (compiled(input_ids=a, labels=a).loss + compiled(input_ids=b, labels=b).loss).backward()
    assert compiled_graphs()[-1].plan.offloaded
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        error = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert error < 1e-5, name


def as_if_replayed_from_cuda_graphs(monkeypatch) -> None:
    """On a CPU, partition and plan as for a step replayed from CUDA graphs (the slot ops), which otherwise only a
    graph on a CUDA device gets."""
    from memgraph import pipeline

    monkeypatch.setattr(pipeline, "replayed_from_cuda_graphs", lambda graph, options: True)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("graphed", [False, True], ids=["pooled", "slots"])
def test_one_timeline_with_transfers(captured, codegen, graphed):
    """The cost model's simulation of an offload plan is the estimate of the graphs the pass builds (with the
    captured transfer ops, each handing backward a token of device storage)."""
    costs = cost_model.graph_costs(captured.graph, codegen=codegen, offload_budget=1 << 30, cudagraphs=graphed)
    plan = get("offload-layers").function(captured.graph, costs, None)
    fw, bw = partition(captured.graph.private_copy(), plan, captured=graphed)
    simulated = costs.estimate(plan)
    partitioned = cost_model.estimate_partitioned(captured.graph, fw, bw, codegen=codegen)
    assert simulated.peak_bytes_hint == partitioned.peak_bytes_hint == plan.peak_bytes
    assert list(simulated.during) == list(partitioned.during)


def lowest_offload_peak(costs) -> int:
    """The least peak offload reaches from the leanest keep/recompute plan (below it: no heuristic plan)."""
    return int(offload_until_fits(costs, leanest_saved(costs), 0)[1].peak_bytes_hint)


def test_offload_is_chosen_where_recompute_cannot_reach(captured):
    """Under a budget below the leanest structural keep/recompute plan, greedy offloads; ilp may find a
    keep/recompute plan there, but both plans are valid and fit."""
    costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30)
    budget = lowest_offload_peak(costs)
    assert budget < costs.peak(leanest_saved(costs))
    with pytest.raises(InfeasibleBudgetError):  # without offload greedy cannot get there
        get("greedy").function(captured.graph, cost_model.graph_costs(captured.graph), budget)
    for solver in ("greedy", "ilp"):
        plan = get(solver).function(captured.graph, costs, budget)
        assert plan.peak_bytes <= budget and set(plan.offloaded) <= set(plan.saved)
        assert costs.is_valid(costs.indices(plan.saved))
        assert plan.offloaded or solver == "ilp"
        fw, bw = partition(captured.graph.private_copy(), plan)
        assert_transfers_are_ordered(plan, fw, bw, captured.graph.num_fwd_outputs)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(room=st.floats(min_value=0.0, max_value=0.5))
def test_offload_plans_keep_what_the_budget_has_room_for(captured, room):
    """From an offload plan, recomputed values are kept while the peak stays within the budget: never more recompute
    time, never above the budget, the offloaded values unchanged; with room, some recompute time is spared."""
    from memgraph.cost_model.solvers.offload import keep_what_fits

    costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30)
    start = captured.partitions["offload-layers"].plan
    saved, offloaded = costs.indices(start.saved), costs.indices(start.offloaded)
    budget = int(start.peak_bytes * (1 + room))
    kept, estimate = keep_what_fits(costs, saved, offloaded, budget)
    assert kept >= saved and costs.is_valid(kept)
    assert estimate.peak_bytes_hint == costs.simulate(kept, offloaded=offloaded).peak_bytes_hint <= budget
    assert costs.recompute_seconds(kept) <= costs.recompute_seconds(saved)
    if room >= 0.25:
        assert costs.recompute_seconds(kept) < costs.recompute_seconds(saved)
    plan = costs.plan("ilp", kept, budget, estimate=estimate, offloaded=offloaded)
    fw, bw = partition(captured.graph.private_copy(), plan)
    assert_transfers_are_ordered(plan, fw, bw, captured.graph.num_fwd_outputs)


def test_offload_plans_are_completed_before_they_are_compared(captured):
    """``with_offload`` weighs each offload plan once it keeps what fits. Compared before that, the leanest
    set's offload plan lost to a keep/recompute plan a transfer's worth faster, so a larger budget could give
    more recompute than a smaller one (Llama-3-8B at 8192 tokens: 222 against 170 ms at 8 and 6.75 GiB)."""
    import dataclasses

    from memgraph.cost_model.solvers.offload import added_seconds, keep_what_fits, layer_inputs, with_offload

    costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30)
    low, high = lowest_offload_peak(costs), costs.peak(costs.save_all)
    budget = int(low + 0.5 * (high - low))
    lean = leanest_saved(costs)
    offloaded, estimate = offload_until_fits(costs, lean, budget, seed=layer_inputs(costs))
    uncompleted = costs.plan("lean", lean, budget, estimate=estimate, offloaded=offloaded)
    kept, kept_estimate = keep_what_fits(costs, lean, offloaded, budget)
    completed = costs.plan("lean", kept, budget, estimate=kept_estimate, offloaded=offloaded)
    assert offloaded and added_seconds(completed) < added_seconds(uncompleted)  # room to keep values
    between = (added_seconds(completed) + added_seconds(uncompleted)) / 2

    def keep_recompute(graph, costs, budget_bytes, **_):
        """A keep/recompute plan between the two (any solver's at this budget), infeasible when relaxed."""
        if budget_bytes != budget:
            raise InfeasibleBudgetError("relaxed budgets: none")
        plan = costs.plan("keep-recompute", costs.save_least, None)
        return dataclasses.replace(plan, recompute_seconds=between, transfer_seconds=0.0, offloaded=[])

    plan = with_offload(keep_recompute)(captured.graph, costs, budget)
    assert plan.offloaded and added_seconds(plan) <= added_seconds(completed) + 1e-12


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(room=st.floats(min_value=0.05, max_value=0.5))
def test_recomputed_values_are_offloaded_where_copies_cost_less(captured, room, monkeypatch):
    """From an offload plan, recomputed values move to the host (saved and offloaded) only where that lowers the
    predicted added time within the budget by more than the new ops' host time: over a fast host link some
    recompute is spared; over a link too slow to hide a copy, or where issuing the copies costs the host more than
    the recompute they spare, nothing moves; the plans stay valid and their transfers ordered."""
    from memgraph.cost_model.runtime import DeviceSpec
    from memgraph.cost_model.solvers import offload as solver
    from memgraph.cost_model.solvers.offload import added_seconds, offload_what_spares_recompute

    start = captured.partitions["offload-layers"].plan
    for link, host_seconds, moves in ((1e15, 0.0, True), (1e3, 0.0, False), (1e15, 1.0, False)):
        monkeypatch.setattr(solver, "HOST_SECONDS_PER_OFFLOADED_VALUE", host_seconds)
        costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30,
                                       device=DeviceSpec(host_link_bytes_per_s=link))
        saved, offloaded = costs.indices(start.saved), costs.indices(start.offloaded)
        budget = int(costs.simulate(saved, offloaded=offloaded).peak_bytes_hint * (1 + room))
        before = costs.plan("start", saved, budget, offloaded=offloaded)
        new_saved, new_offloaded, estimate = offload_what_spares_recompute(costs, saved, offloaded, budget)
        assert new_saved >= saved and new_offloaded >= offloaded
        assert new_offloaded - offloaded == new_saved - saved  # everything added waits on the host
        assert costs.is_valid(new_saved) and estimate.peak_bytes_hint <= budget
        plan = costs.plan("moved", new_saved, budget, estimate=estimate, offloaded=new_offloaded)
        assert added_seconds(plan) <= added_seconds(before)
        assert (added_seconds(plan) < added_seconds(before)) == moves and bool(new_offloaded - offloaded) == moves
        fw, bw = partition(captured.graph.private_copy(), plan)
        assert_transfers_are_ordered(plan, fw, bw, captured.graph.num_fwd_outputs)


def test_host_budget_bounds_what_is_offloaded(captured):
    one_value = captured.partitions["offload-layers"].plan.details["transfers"][0]["nbytes"]
    costs = cost_model.graph_costs(captured.graph, offload_budget=one_value)
    plan = get("offload-layers").function(captured.graph, costs, None)
    assert plan.host_bytes <= one_value and len(plan.offloaded) == 1


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.9, max_value=1.1))
def test_simulated_peak_respects_the_budget(captured, fraction):
    costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30)
    budget = int(captured.partitions["offload-layers"].plan.peak_bytes * fraction)
    try:
        plan = get("greedy").function(captured.graph, costs, budget)
    except InfeasibleBudgetError:
        assert fraction < 1.0  # offload-layers' own peak is always reachable
        return
    estimate = costs.simulate(costs.indices(plan.saved), offloaded=costs.indices(plan.offloaded))
    assert plan.peak_bytes == estimate.peak_bytes_hint <= budget


# greedy's keep/recompute plans reach lower under Inductor's memory model: its offload case runs eager codegen
@pytest.mark.parametrize("solver, codegen, device, graphed", [
    ("offload-layers", "eager", "cpu", False), ("offload-layers", "inductor", "cpu", False),
    ("greedy", "eager", "cpu", False),
    ("offload-layers", "inductor", "cpu", True),  # the slot ops, compiled (without a CUDA graph on a CPU)
    # on CUDA the copies run on the side stream into pinned buffers, ordered by events under Inductor's codegen
    pytest.param("offload-layers", "inductor", "cuda", False, marks=pytest.mark.cuda),
    pytest.param("greedy", "eager", "cuda", False, marks=pytest.mark.cuda)])
def test_offloaded_step_gives_eager_gradients(solver, codegen, device, graphed, monkeypatch):
    model = four_layer_llama().to(device)
    reference = copy.deepcopy(model)
    ids = token_ids(SEQ).to(device)
    reference(input_ids=ids, labels=ids).loss.backward()
    budget = None
    if solver == "greedy":  # a budget only offload reaches, in the memory model of this codegen
        (graph,) = capture(copy.deepcopy(model), options=OFFLOAD_ON, solvers=(), input_ids=ids, labels=ids)
        budget = lowest_offload_peak(cost_model.graph_costs(graph.graph, codegen=codegen, offload_budget=1 << 30))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph", options={**OFFLOAD_ON, "solver": solver, "codegen": codegen,
                                                                 "memory_budget": budget, "cache": False})
    if graphed:
        as_if_replayed_from_cuda_graphs(monkeypatch)
    for _ in range(2):  # the second step reuses the pinned buffers of the first
        model.zero_grad(set_to_none=True)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    plan = compiled_graphs()[-1].plan
    assert plan.offloaded, plan.summary()
    tolerance = 1e-5 if device == "cpu" else 1e-3  # TF32-free fp32, but Inductor's CUDA kernels reorder sums
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        error = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert error < tolerance, name


_CALL = re.compile(r"^\s*(?:(\w+) = )?([\w.]+)\((.*)\)\s*$")
_TRANSFER = re.compile(r"torch\.ops\.memgraph\.(offload|reload|offload_to_slot|reload_from_slot|wait_transfer|"
                       r"wait_captured_transfer)\.default")


def calls_between_copies_and_waits(code: str) -> list[int]:
    """For each copy op in one graph's emitted code, how many other calls run between it and its wait (paired by
    the copy's source, which the wait keeps alive)."""
    calls = [m.groups() for m in map(_CALL.match, code.splitlines()) if m and not m.group(2).startswith(
        ("assert_", "reinterpret_tensor", "empty_strided", "del", "torch.empty"))]
    started: dict[str, int] = {}
    between = []
    for index, (_, function, args) in enumerate(calls):
        transfer = _TRANSFER.search(function)
        if transfer is None:
            continue
        first, *rest = [a.strip() for a in args.split(",")]
        if transfer.group(1).startswith("wait"):
            between.append(index - started.pop(rest[0]) - 1)
        else:
            started[first] = index
    assert not started, f"copies without a wait in the emitted code: {started}"
    return between


def test_transfer_ops_are_tied_to_the_nearest_buffer_that_costs_little_to_hold():
    """A reload or wait reads the nearest matmul-like output before it when holding that a few ops longer is cheap
    (at most TIE_BYTES_PER_BYTE times the value), else the nearest one alive past it anyway, else nothing."""
    from memgraph.cost_model.transfers import TIE_BYTES_PER_BYTE, Transfer, Transfers, tie_points

    value = 1 << 20
    placed = Transfers(tuple(Transfer(v, value, 0.0, "", None, "", "") for v in ("v", "w", "x")))
    sizes = {"mm_small": value, "mm_kept": 64 * value, "mm_logits": (TIE_BYTES_PER_BYTE + 1) * value, "add": None}
    sequence = [("node", "mm_small"), ("wait_offload", "v"), ("node", "mm_kept"), ("node", "mm_logits"),
                ("node", "add"), ("wait_offload", "w"), ("reload", "x")]
    reads = {4: ["mm_logits"], 6: ["mm_small"]}  # mm_kept is an output: alive to the end
    tied = tie_points(sequence, placed, sizes.get, lambda position: reads.get(position, ()), ["mm_kept"])
    assert tied == {("wait_offload", "v"): "mm_small", ("wait_offload", "w"): "mm_kept", ("reload", "x"): "mm_kept"}
    assert tie_points(sequence, placed, sizes.get, lambda position: (), []) == {("wait_offload", "v"): "mm_small"}


@pytest.mark.parametrize("graphed", [False, True])
def test_inductor_runs_transfers_where_the_plan_put_them(graphed, monkeypatch):
    """Inductor's scheduler moves what nothing orders: its peak-memory reordering put each wait right after its
    copy, and fusing two layers' rotary embeddings pulled a reload's wait a layer early. The pass ties each reload
    and wait to the node the plan put before it, so a copy keeps the compute it was to hide behind."""
    from memgraph import _compat

    if graphed:
        as_if_replayed_from_cuda_graphs(monkeypatch)
    model, ids = four_layer_llama(), token_ids(SEQ)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph", options={**OFFLOAD_ON, "solver": "offload-layers",
                                                                 "codegen": "inductor", "cache": False})
    codes = _compat.inductor_output_code(lambda: compiled(input_ids=ids, labels=ids).loss.backward())
    assert len(codes) == 2 and compiled_graphs()[-1].plan.offloaded
    for code in codes:  # each layer input's copy runs behind a layer's worth of kernels, in forward and backward
        between = calls_between_copies_and_waits(code)
        assert len(between) == len(compiled_graphs()[-1].plan.offloaded) and min(between) >= 3, between


def test_values_offloaded_instead_of_recomputed_give_eager_gradients(monkeypatch):
    """A plan in which ``offload_what_spares_recompute`` moved recomputed values to the host (given a fast host link
    and no host cost per transfer) compiles to a step with eager's gradients: backward reads those values from
    their reloads instead of recomputing them."""
    from memgraph.cost_model import solvers
    from memgraph.cost_model.runtime import DeviceSpec
    from memgraph.cost_model.solvers import offload as solver
    from memgraph.cost_model.solvers.offload import offload_what_spares_recompute

    monkeypatch.setattr(solver, "HOST_SECONDS_PER_OFFLOADED_VALUE", 0.0)
    monkeypatch.setattr(solvers, "_REGISTRY", dict(solvers._REGISTRY))
    moved = []

    @solvers.register("offload-layers-then-spare-recompute", uses_budget=False)
    def spare_recompute(graph, costs=None, budget=None, **_):
        costs = cost_model.graph_costs(graph, codegen="eager", offload_budget=1 << 30,
                                       device=DeviceSpec(host_link_bytes_per_s=1e15))
        start = get("offload-layers").function(graph, costs, None)
        saved, offloaded = costs.indices(start.saved), costs.indices(start.offloaded)
        room = 2 * costs.simulate(saved, offloaded=offloaded).peak_bytes_hint
        saved, more, estimate = offload_what_spares_recompute(costs, saved, offloaded, room)
        moved.append(costs.names_of(more - offloaded))
        return costs.plan("offload-layers-then-spare-recompute", saved, None, estimate=estimate, offloaded=more)

    model = four_layer_llama()
    reference = copy.deepcopy(model)
    ids = token_ids(SEQ)
    reference(input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph", options={
        **OFFLOAD_ON, "solver": "offload-layers-then-spare-recompute", "cache": False})
    compiled(input_ids=ids, labels=ids).loss.backward()
    plan = compiled_graphs()[-1].plan
    assert moved and moved[-1] and set(moved[-1]) <= set(plan.offloaded), plan.summary()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        error = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert error < 1e-5, name


def test_offload_options():
    assert resolve_options({"offload_budget": "2GiB"}).offload_budget == 2 * 2**30
    with pytest.raises(ValueError, match="offload_budget"):
        resolve_options({"offload_budget": "lots"})
    with pytest.raises(MemgraphError, match="auto"):
        resolve_options({"offload": "sometimes"})


def test_cpu_graph_ignores_offload_under_auto(make_ids):
    ids = make_ids(24)
    from .conftest import tiny_model

    (graph,) = capture(tiny_model("llama"), options={"rewrites": False, "solver": "greedy"}, solvers=("greedy",),
                       input_ids=ids, labels=ids)
    assert graph.costs.offload_budget is None
    assert not graph.partitions["greedy"].plan.offloaded


def test_transfer_ops_round_trip_on_cpu():
    from memgraph.kernels.offload import offload, reload, wait_transfer

    value = torch.randn(3, 5)
    host = wait_transfer(offload(value), value)
    back = wait_transfer(reload(host, value.device), host)
    assert torch.equal(back, value) and back.data_ptr() != value.data_ptr()


@pytest.mark.cuda
def test_transfer_ops_round_trip_on_cuda_behind_compute():
    """The copy runs on the side stream; the value is not freed or overwritten before the copy has read it."""
    from memgraph.kernels.offload import host_pool_bytes, offload, reload, wait_transfer

    value = torch.randn(1024, 1024, device="cuda")
    expected = value.cpu()
    host = offload(value)
    busy = value @ value  # compute queued behind the copy's start on the main stream
    host = wait_transfer(host, value)
    assert host.device.type == "cpu" and host.is_pinned()
    del value
    back = wait_transfer(reload(host, torch.device("cuda")), host)
    torch.cuda.synchronize()
    assert torch.equal(back.cpu(), expected) and busy.isfinite().all()
    assert host_pool_bytes() >= expected.numel() * expected.element_size()


def test_cuda_graph_steps_issue_offloads_at_no_host_cost(captured, monkeypatch):
    """A step replayed from CUDA graphs issues its captured copies without the host: where each transfer's host
    time outweighs the recompute it spares, only the graphed plan moves recomputed values to the host."""
    from memgraph.cost_model.runtime import DeviceSpec
    from memgraph.cost_model.solvers import offload as solver

    monkeypatch.setattr(solver, "HOST_SECONDS_PER_OFFLOADED_VALUE", 1.0)
    moved = {}
    for graphed in (False, True):
        costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30, cudagraphs=graphed,
                                       device=DeviceSpec(host_link_bytes_per_s=1e15))
        start = get("offload-layers").function(captured.graph, costs, None)
        saved, offloaded = costs.indices(start.saved), costs.indices(start.offloaded)
        room = 2 * costs.simulate(saved, offloaded=offloaded).peak_bytes_hint
        _, more, _ = solver.offload_what_spares_recompute(costs, saved, offloaded, room)
        moved[graphed] = more - offloaded
    assert not moved[False] and moved[True]


@pytest.mark.parametrize("headroom", [1.0, 1.25, 2.0])
def test_copies_are_placed_with_headroom_as_on_a_slower_link(captured, headroom, monkeypatch):
    """``TRANSFER_HEADROOM`` places every copy as a link that many times slower would: the same waits, reloads
    and predicted stall."""
    from memgraph.cost_model import transfers
    from memgraph.cost_model.runtime import DeviceSpec

    def placed(link: float, factor: float):
        monkeypatch.setattr(transfers, "TRANSFER_HEADROOM", factor)
        costs = cost_model.graph_costs(captured.graph, offload_budget=1 << 30,
                                       device=DeviceSpec(host_link_bytes_per_s=link))
        plan = get("offload-layers").function(captured.graph, costs, None)
        estimate = costs.simulate(costs.indices(plan.saved), offloaded=costs.indices(plan.offloaded))
        return estimate.transfers

    link = 2e6  # slow enough that where a copy waits depends on its time
    with_headroom, slower = placed(link, headroom), placed(link / headroom, 1.0)
    assert [dataclasses.replace(t, seconds=0) for t in with_headroom.items] == \
        [dataclasses.replace(t, seconds=0) for t in slower.items]
    assert with_headroom.stall_seconds == pytest.approx(slower.stall_seconds)
    assert [t.seconds for t in with_headroom.items] == pytest.approx([t.seconds / headroom for t in slower.items])
    if headroom > 1:  # and it matters at this link: the copies take longer than some compute they hide behind
        assert with_headroom.stall_seconds > placed(link, 1.0).stall_seconds
