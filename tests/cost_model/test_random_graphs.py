"""Random small MLP-like programs (views, in-place-free aliasing, reductions, random ops), traced into joint
graphs: the prediction equals the tracker, for every plan, at every node."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memgraph import cost_model
from memgraph.capture import capture_function
from memgraph.cost_model.tracker import MemoryTracker, run_step


def _linear(h, w, state):
    return h @ w


def _residual(h, w, state):
    return h + state["previous"]


def _norm(h, w, state):
    return F.layer_norm(h, h.shape[-1:])


def _softmax(h, w, state):
    return torch.softmax(h, dim=-1) * h


def _centre(h, w, state):
    return h - h.mean(dim=-1, keepdim=True)


def _views(h, w, state):
    return h.reshape(-1).view(h.shape).t().t() * 2


def _slice_cat(h, w, state):
    k = h.shape[-1] // 2
    return torch.cat([h[:, k:], h[:, :k].tanh()], dim=-1)


def _chunk_swap(h, w, state):
    a, b = h.chunk(2, dim=-1)
    return torch.cat([b * a.sigmoid(), a], dim=-1)


def _expand(h, w, state):
    return h + h.sum(dim=0, keepdim=True).expand_as(h)


def _dropout(h, w, state):
    return F.dropout(h, p=0.25, training=True)


def _outer(h, w, state):
    return h @ (h.t() @ h) / h.shape[0]


OPS = {"linear": _linear, "relu": lambda h, w, s: torch.relu(h), "gelu": lambda h, w, s: F.gelu(h),
       "silu": lambda h, w, s: F.silu(h), "residual": _residual, "norm": _norm, "softmax": _softmax,
       "centre": _centre, "views": _views, "slice_cat": _slice_cat, "chunk_swap": _chunk_swap,
       "expand": _expand, "dropout": _dropout, "outer": _outer}


@st.composite
def programs(draw):
    return {
        "batch": draw(st.integers(1, 6)),
        "width": draw(st.sampled_from([8, 16, 40, 96])),
        "ops": draw(st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=7)),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "input_grad": draw(st.booleans()),
    }


def build(program):
    def step(x, *weights):
        h, state = x, {"previous": x}
        for i, name in enumerate(program["ops"]):
            h_next = OPS[name](h, weights[i % len(weights)], state)
            state["previous"], h = h, h_next
        return ((h @ weights[-1]).float() ** 2).mean()  # a trainable weight is always on the loss's path

    generator = torch.Generator().manual_seed(len(program["ops"]))
    width, dtype = program["width"], program["dtype"]
    x = torch.randn(program["batch"], width, generator=generator).to(dtype).requires_grad_(program["input_grad"])
    weights = [(torch.randn(width, width, generator=generator) / width**0.5).to(dtype).requires_grad_()
               for _ in range(2)]
    return step, [x, *weights]


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_random_program_prediction_equals_tracker(program):
    step, inputs = build(program)
    (captured,) = capture_function(step, *inputs, solvers=("none", "mincut"))
    for solver, part in captured.partitions.items():
        predicted = cost_model.estimate_partitioned(part.graph, part.fw, part.bw)
        measured = run_step(part.fw, part.bw, captured.primals, part.graph.num_fwd_outputs, tracker=MemoryTracker())
        assert predicted.peak_bytes_hint == measured.peak_bytes, (solver, program)
        during = {(n, p): int(d) for n, p, d in zip(predicted.names, predicted.phases, predicted.during)}
        assert all(during[(n, p)] == m for n, p, m in measured.per_node if (n, p) in during), (solver, program)
        # The joint-graph simulation of the same saved set is the same prediction.
        simulated = cost_model.graph_costs(part.graph).estimate(part.plan)
        assert simulated.peak_bytes_hint == predicted.peak_bytes_hint


@settings(max_examples=10, deadline=None)
@given(programs(), st.sampled_from([1, 512]))
def test_granularity_is_what_both_sides_round_to(program, granularity):
    step, inputs = build(program)
    (captured,) = capture_function(step, *inputs)
    semantics = cost_model.StepSemantics(granularity=granularity)
    predicted = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw, semantics=semantics)
    measured = run_step(captured.fw, captured.bw, captured.primals, captured.graph.num_fwd_outputs,
                        tracker=MemoryTracker(granularity=granularity))
    assert predicted.peak_bytes_hint == measured.peak_bytes
