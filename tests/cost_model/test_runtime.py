"""Per-node runtime: FLOPs from torch's registered formulas, bytes moved, roofline seconds, node kinds."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from memgraph import cost_model
from memgraph.cost_model import runtime
from memgraph.capture import capture_function


def _joint_of(fn, *inputs):
    (captured,) = capture_function(fn, *inputs, solvers=("mincut",))
    return captured


def test_matmul_flops_and_roofline():
    a = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(32, 48, requires_grad=True)
    captured = _joint_of(lambda x, y: (x @ y).relu().sum(), a, b)
    costs = captured.costs
    mm = next(n for n in captured.graph.joint.graph.nodes if n.target is torch.ops.aten.mm.default)
    assert costs.flops(costs.index[mm.name]) == 2 * 64 * 32 * 48
    device = cost_model.DeviceSpec(fp32_matmul_flops_per_s=1e9, bandwidth_bytes_per_s=1e15)
    assert runtime.node_seconds(mm, device) == pytest.approx(2 * 64 * 32 * 48 / 1e9)
    # Memory-bound when bandwidth is the ceiling: bytes read + written over bandwidth.
    slow_memory = cost_model.DeviceSpec(fp32_matmul_flops_per_s=1e18, bandwidth_bytes_per_s=1e6)
    moved = (64 * 32 + 32 * 48 + 64 * 48) * 4
    assert runtime.node_bytes_moved(mm) == moved
    assert runtime.node_seconds(mm, slow_memory) == pytest.approx(moved / 1e6)
    assert costs.kinds[costs.index[mm.name]] == runtime.MATMUL


def test_views_cost_nothing_and_kinds():
    x = torch.randn(8, 16, requires_grad=True)
    captured = _joint_of(lambda t: torch.nn.functional.dropout(t.t().relu(), 0.5).sum(), x)
    costs = captured.costs
    by_target = {}
    for node in captured.graph.joint.graph.nodes:  # the first (forward) node of each op
        by_target.setdefault(node.target, costs.index.get(node.name))
    transpose = by_target[torch.ops.aten.t.default]
    assert costs.seconds[transpose] == 0.0 and costs.kinds[transpose] == runtime.VIEW
    assert costs.allocated_bytes(transpose) == 0
    relu = by_target[torch.ops.aten.relu.default]
    assert costs.kinds[relu] == runtime.POINTWISE and costs.seconds[relu] > 0
    dropout = by_target[torch.ops.aten.native_dropout.default]
    assert costs.kinds[dropout] == runtime.RANDOM
    assert costs.kinds[by_target[torch.ops.aten.sum.default]] == runtime.REDUCTION
    # A view keeps its base's storage: saving it costs the base's bytes; running it allocates nothing.
    primal = costs.index[captured.graph.primals[0].name]
    assert costs.output_bytes(transpose) == costs.output_bytes(primal)
    assert costs.storage_base(transpose) == primal


def test_recompute_seconds_sums_the_recomputed_nodes():
    x = torch.randn(128, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    captured = _joint_of(lambda a, b: torch.sin(a @ b).pow(2).sum(), x, w)
    part = captured.partitions["mincut"]
    assert part.plan.recomputed == ["sin"], "min-cut keeps mm and recomputes sin from it"
    device = cost_model.DeviceSpec()
    expected = sum(runtime.node_seconds(part.graph.node(n), device) for n in part.plan.recomputed)
    assert part.plan.recompute_seconds == pytest.approx(expected)
    costs = cost_model.graph_costs(part.graph)
    assert costs.recompute_seconds(costs.indices(part.plan.saved)) == pytest.approx(expected)


def test_custom_op_flop_formula_is_used():
    from torch.utils.flop_counter import register_flop_formula

    @torch.library.custom_op("memgraph_test::scaled_mm", mutates_args=())
    def scaled_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b) * 2

    @scaled_mm.register_fake
    def _(a, b):
        return a.new_empty(a.shape[0], b.shape[1])

    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return scaled_mm(grad, b.t()), scaled_mm(a.t(), grad)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    scaled_mm.register_autograd(backward, setup_context=setup)

    @register_flop_formula(torch.ops.memgraph_test.scaled_mm)
    def _flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    a = torch.randn(16, 8, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    captured = _joint_of(lambda x, y: scaled_mm(x, y).sum(), a, b)
    node = next(n for n in captured.graph.joint.graph.nodes
                if n.target is torch.ops.memgraph_test.scaled_mm.default)
    i = captured.costs.index[node.name]
    assert captured.costs.flops(i) == 2 * 16 * 8 * 4
    assert captured.costs.kinds[i] == runtime.CUSTOM
    # Its memory comes from its fake implementation, and nothing about it is unknown.
    assert captured.costs.allocated_bytes(i) == 512  # 16*4 floats, rounded to the allocator's 512 bytes
    estimate = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw)
    assert not estimate.unknown_ops


def test_device_spec_defaults_and_dtype_ceilings():
    spec = cost_model.DeviceSpec()
    assert spec.flops_per_s(torch.bfloat16) == pytest.approx(790e12)
    assert spec.bandwidth_bytes_per_s == pytest.approx(4.0e12)
    assert spec.flops_per_s(torch.float32) < spec.flops_per_s(torch.bfloat16) < spec.flops_per_s(torch.float8_e4m3fn)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            cost_model.DeviceSpec.measure()


def test_placeholder_and_output_have_no_cost():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(x)
    (node,) = [n for n in graph.nodes if n.op == "placeholder"]
    assert runtime.node_seconds(node) == 0.0


def test_real_tensors_inside_a_fake_tensor_trace():
    """The partitioner runs inside AOTAutograd's FakeTensorMode: what the cost model measures there must run on
    real tensors (a host-link figure timed on fake copies came out 15-20x any PCIe link)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memgraph import _compat

    with FakeTensorMode():
        assert _compat.is_fake_tensor(torch.empty(4))
        with _compat.real_tensors():
            made = torch.empty(4).fill_(1.0)
            assert not _compat.is_fake_tensor(made) and float(made.sum()) == 4.0


@pytest.mark.cuda
def test_host_link_measured_inside_a_fake_tensor_trace_is_the_real_one(tmp_path, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memgraph import _compat
    from memgraph.cost_model.runtime import measured_host_link

    monkeypatch.setattr(_compat, "inductor_cache_dir", lambda: str(tmp_path / "outside"))
    outside = measured_host_link()
    monkeypatch.setattr(_compat, "inductor_cache_dir", lambda: str(tmp_path / "inside"))
    with FakeTensorMode():
        inside = measured_host_link()
    assert 0.5 < inside / outside < 2.0, (inside, outside)
