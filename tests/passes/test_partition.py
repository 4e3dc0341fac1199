"""Random small MLP/attention-like graphs through memgraph.plan + partition give eager's outputs and grads."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import memgraph
from memgraph.graph import TrainingGraph
from memgraph.passes.partition import InvalidPlanError, partition
from memgraph.plan import Plan
from tests.helpers import relative_error

WIDTH = 8
UNARY = ["tanh", "relu", "gelu", "sigmoid", "layer_norm", "softmax", "exp_neg_square"]
BINARY = ["add", "mul", "matmul_param", "attention"]


class RandomNet(torch.nn.Module):
    """A graph built from a program: each step applies an op to earlier values (so values have many users)."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        self.embed = torch.nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)  # every program trains something
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5) for _ in program])

    def forward(self, x):
        values = [x @ self.embed]
        for index, (op, a, b) in enumerate(self.program):
            u, v = values[a % len(values)], values[b % len(values)]
            values.append(_apply(op, u, v, self.weights[index]))
        return sum(value.square().mean() for value in values[1:])


def _apply(op, u, v, weight):
    if op == "tanh":
        return torch.tanh(u)
    if op == "relu":
        return torch.relu(u)
    if op == "gelu":
        return torch.nn.functional.gelu(u)
    if op == "sigmoid":
        return torch.sigmoid(u)
    if op == "layer_norm":
        return torch.nn.functional.layer_norm(u, (WIDTH,))
    if op == "softmax":
        return torch.softmax(u, dim=-1)
    if op == "exp_neg_square":
        return torch.exp(-u * u)
    if op == "add":
        return u + v
    if op == "mul":
        return u * v
    if op == "matmul_param":
        return u @ weight
    if op == "attention":
        scores = (u @ weight) @ v.transpose(-1, -2) / WIDTH**0.5
        return torch.softmax(scores, dim=-1) @ v
    raise AssertionError(op)


programs = st.lists(
    st.tuples(st.sampled_from(UNARY + BINARY), st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs, solver=st.sampled_from(["none", "mincut"]), input_grad=st.booleans())
def test_random_graphs_match_eager(program, solver, input_grad):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = RandomNet(program)
    x = torch.randn(3, WIDTH, requires_grad=input_grad)
    expected = net(x)
    expected.backward()
    expected_grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    expected_x_grad = x.grad.clone() if input_grad else None

    plan = memgraph.plan(copy.deepcopy(net), x.detach().requires_grad_(input_grad), solver=solver)
    assert plan.solver == solver and plan.saved

    compiled_net = copy.deepcopy(net)
    compiled_net.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_(input_grad)
    actual = torch.compile(compiled_net, backend="memgraph", options={"codegen": "eager", "solver": solver})(x2)
    actual.backward()
    assert relative_error(actual, expected) < 1e-5
    actual_grads = [p.grad for p in compiled_net.parameters() if p.grad is not None]
    assert len(actual_grads) == len(expected_grads)
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) < 1e-5
    if input_grad:
        assert relative_error(x2.grad, expected_x_grad) < 1e-5


def _capture_training_graph(fn, *args):
    from functorch.compile import aot_function, make_boxed_func

    captured = {}

    def partition_fn(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        captured["graph"] = TrainingGraph(joint, list(joint_inputs), num_fwd_outputs)
        return memgraph.partitioner(codegen="eager", solver="none")(joint, joint_inputs,
                                                                     num_fwd_outputs=num_fwd_outputs, **kwargs)

    compiled = aot_function(fn, fw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=partition_fn)
    compiled(*args).sum().backward()
    return captured["graph"]


def test_partitioner_is_an_aot_partition_fn_and_records_its_plan():
    from functorch.compile import aot_function, make_boxed_func

    weight = torch.randn(WIDTH, WIDTH, requires_grad=True)
    x = torch.randn(4, WIDTH)
    partitioner = memgraph.partitioner(solver="mincut", codegen="eager")
    compiled = aot_function(lambda a, w: torch.tanh(a @ w).sum(), fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                            partition_fn=partitioner)
    compiled(x, weight).backward()
    expected = (1 - torch.tanh(x @ weight.detach()) ** 2)
    assert relative_error(weight.grad, x.t() @ expected) < 1e-6
    assert partitioner.record.plan is not None and partitioner.record.plan.solver == "mincut"


def test_a_plan_that_saves_too_little_is_rejected():
    weight = torch.randn(WIDTH, WIDTH, requires_grad=True)
    graph = _capture_training_graph(lambda a, w: torch.tanh(a @ w), torch.randn(4, WIDTH), weight)
    with pytest.raises(InvalidPlanError, match="cannot be applied"):
        partition(graph, Plan(solver="nothing", saved=[], recomputed=[]))


def test_saving_only_inputs_recomputes_the_forward_in_backward():
    weight = torch.randn(WIDTH, WIDTH, requires_grad=True)
    x = torch.randn(4, WIDTH)
    graph = _capture_training_graph(lambda a, w: torch.tanh(a @ w), x, weight)
    primal_names = [p.name for p in graph.primals]
    fw, bw = partition(graph, Plan(solver="inputs-only", saved=primal_names, recomputed=[]))
    recomputed = {str(n.target) for n in bw.graph.nodes if n.op == "call_function"}
    assert any("mm" in target for target in recomputed) and any("tanh" in target for target in recomputed)
