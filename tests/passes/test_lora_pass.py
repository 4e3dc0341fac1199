"""The LoRA rewrite: PEFT's adapter arithmetic becomes memgraph.lora_linear in Dynamo's graph, with eager's loss
and gradients, for PEFT's plain and bitsandbytes LoRA layers; what it cannot prove stays as it was, logged."""
from __future__ import annotations

import copy
import logging
import operator

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

from memgraph.passes.lora import rewrite_lora
from tests.helpers import relative_error, tiny_llama_with_biases

LORA_LINEAR = torch.ops.memgraph.lora_linear.default
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2


def peft_model(dtype=torch.bfloat16, targets=PROJECTIONS, **lora_settings):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_llama_with_biases(LAYERS).to(dtype)
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    settings.update(lora_settings)
    autocast = settings.pop("autocast_adapter_dtype", True)
    model = get_peft_model(model, LoraConfig(**settings), autocast_adapter_dtype=autocast)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: random B makes every gradient count
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def rewritten_step(model, ids):
    """(loss, trainable grads, the rewritten Dynamo graphs) of one step through the rewrite and aot_eager."""
    graphs = []

    def backend(gm, example_inputs):
        gm = rewrite_lora(gm, example_inputs, None)
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, graphs


def eager_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fused(graphs) -> int:
    return sum(n.target is LORA_LINEAR for gm in graphs for n in gm.graph.nodes)


def assert_matches_eager(model, ids, *, loss_rtol, grad_rtol):
    eager_loss, eager_grads = eager_step(copy.deepcopy(model), ids)
    loss, grads, graphs = rewritten_step(model, ids)
    assert abs(float(loss) - float(eager_loss)) <= loss_rtol * abs(float(eager_loss))
    assert grads.keys() == eager_grads.keys()
    worst = max((relative_error(grads[n], g), n) for n, g in eager_grads.items())
    assert worst[0] < grad_rtol, worst
    return graphs


def ids_for(model, rows=2, length=16):
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_adapter_is_fused_with_eager_gradients(dtype):
    model = peft_model(dtype)
    # 16-bit: the float32 sums run in another order, then round to bfloat16 (at most one step apart)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    graphs = assert_matches_eager(model, ids_for(model), loss_rtol=tolerance / 10, grad_rtol=tolerance)
    assert fused(graphs) == LAYERS * len(PROJECTIONS)
    if dtype == torch.bfloat16:  # every float32 matmul (the adapters') now runs inside the op
        linears = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
                   and n.target is not LORA_LINEAR]
        assert linears and all(n.meta["example_value"].dtype == torch.bfloat16 for n in linears)

def test_bitsandbytes_qlora_layers_are_fused():
    """PEFT's bitsandbytes Linear4bit adds the delta after casting it to the base's dtype (round_delta)."""
    from tests.passes.test_nf4_pass import qlora, to_bnb_4bit

    torch.manual_seed(0)
    base = to_bnb_4bit(tiny_llama_with_biases(LAYERS).to(torch.bfloat16), weight_dtype=torch.bfloat16,
                       compute_dtype=torch.bfloat16)
    base.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it: PEFT's bnb LoRA layers
    model = qlora(base)
    assert type(model.base_model.model.model.layers[0].mlp.down_proj).__module__ == "peft.tuners.lora.bnb"
    ids = ids_for(model).to(next(model.parameters()).device)
    graphs = assert_matches_eager(model, ids, loss_rtol=1e-3, grad_rtol=1e-2)
    assert fused(graphs) == LAYERS * len(PROJECTIONS)
    assert any(n.args[5] is True for gm in graphs for n in gm.graph.nodes if n.target is LORA_LINEAR)


@pytest.mark.parametrize("settings, reason", [
    ({"lora_dropout": 0.1}, "LoRA dropout"),
    ({"autocast_adapter_dtype": False}, "adapters in torch.bfloat16"),
])
def test_unprovable_adapters_are_left_unchanged_and_logged(settings, reason, caplog):
    model = peft_model(torch.bfloat16, **settings)
    model.eval()  # dropout off in both runs: the graphs still hold it
    with caplog.at_level(logging.INFO, logger="memgraph.passes.lora"):
        graphs = assert_matches_eager(model, ids_for(model), loss_rtol=1e-6, grad_rtol=1e-6)
    assert fused(graphs) == 0
    assert reason in caplog.text


def test_dora_trains_as_eager():
    """DoRA scales the sum by a learned magnitude: not PEFT's plain sum, so whatever is left unfused must still
    give eager's gradients."""
    model = peft_model(torch.float32, targets=["q_proj", "v_proj"], use_dora=True)
    assert_matches_eager(model, ids_for(model), loss_rtol=1e-6, grad_rtol=1e-5)


def test_a_model_without_adapters_is_untouched():
    torch.manual_seed(0)
    model = tiny_llama_with_biases(LAYERS)
    _, _, graphs = rewritten_step(model, ids_for(model))
    assert fused(graphs) == 0


def test_through_the_backend_with_every_rewrite(caplog):
    """backend="memgraph" with its default rewrites: the note names the fused adapters; eager's gradients."""
    from tests.helpers import compare_to_eager

    model = peft_model(torch.float32)
    with caplog.at_level(logging.INFO, logger="memgraph"):
        compare_to_eager(model, ids_for(model), {"codegen": "eager"}, loss_rtol=1e-5, grad_rtol=1e-4)
    assert f"lora: {LAYERS * len(PROJECTIONS)} LoRA adapter sums -> memgraph.lora_linear" in caplog.text


@pytest.mark.parametrize("dynamic", [False, True])
def test_joint_graph_sums_x_gradients_inside_the_backward_op(dynamic):
    """In the joint graph every adapter whose input needs a gradient adds the base layer's gradient into its own
    (no separate [tokens, K] tensor for the sum); layer 0's q/k/v read the frozen embedding's output: no dx. Also
    with symbolic batch and length (as memgraph fit captures)."""
    from memgraph.capture import capture

    model = peft_model(torch.bfloat16)
    ids = ids_for(model)
    dims = {"dynamic_dims": {"input_ids": [0, 1], "labels": [0, 1]}} if dynamic else {}
    (captured,) = capture(model, options={"codegen": "eager"}, solvers=("checkpoint",), input_ids=ids, labels=ids,
                          **dims)
    backward = [n for n in captured.graph.joint.graph.nodes
                if n.target is torch.ops.memgraph.lora_linear_backward.default]
    assert len(backward) == LAYERS * len(PROJECTIONS)
    assert sum("accumulate" in n.kwargs for n in backward) == LAYERS * len(PROJECTIONS) - 3


def test_bfloat16_through_the_backend_matches_eager():
    from tests.helpers import compare_to_eager

    model = peft_model(torch.bfloat16)
    compare_to_eager(model, ids_for(model), {"codegen": "eager", "rewrites": ["lora"]}, loss_rtol=1e-3,
                     grad_rtol=1e-2)


@pytest.mark.parametrize("solver", ["none", "checkpoint"])
def test_backward_writes_x_gradient_sums_in_place(solver):
    """Where nothing else reads the base layer's gradient, the partitioned backward sums the adapter's part into it
    (``lora_linear_backward_into``): no tensor of x's size for the sum. The cost model's simulation of the joint
    graph and its estimate of the partitioned graphs agree, and the in-place sums give eager's gradients (eager
    and Inductor codegen)."""
    from memgraph import cost_model
    from memgraph.capture import capture
    from tests.helpers import compare_to_eager

    model = peft_model(torch.float32)
    ids = ids_for(model)
    (captured,) = capture(model, options={"codegen": "eager", "rewrites": ["lora"]}, solvers=(solver,),
                          input_ids=ids, labels=ids)
    part = captured.partitions[solver]
    nodes = list(part.bw.graph.nodes)
    into = [n for n in nodes if n.target is torch.ops.memgraph.lora_linear_backward_into.default]
    summed = [n for n in nodes if n.target is torch.ops.memgraph.lora_linear_backward.default and n.kwargs]
    assert len(into) >= LAYERS * 3  # o_proj, down_proj and one of gate/up per layer at least
    assert len(into) + len(summed) == LAYERS * len(PROJECTIONS) - 3
    simulated = captured.costs.estimate(part.plan)
    partitioned = cost_model.estimate_partitioned(part.graph, part.fw, part.bw, codegen="eager")
    assert simulated.peak_bytes_hint == partitioned.peak_bytes_hint
    # the same timeline, but for dx's getitems, which the partitioned graph no longer has (they read g)
    by_name = dict(zip(partitioned.names, partitioned.during))
    assert {n: d for n, d in zip(simulated.names, simulated.during) if n in by_name} == by_name
    model.zero_grad(set_to_none=True)  # capture ran a backward
    for codegen in ("eager", "inductor"):
        compare_to_eager(model, ids, {"codegen": codegen, "rewrites": ["lora"], "solver": solver},
                         loss_rtol=1e-5, grad_rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("weights", ["bf16", "nf4"])
def test_in_place_sums_on_cuda_match_eager(weights):
    """On the GPU (Triton kernels, Inductor's CUDA codegen, the in-place sums into nf4/mm input gradients) the
    adapters' gradients equal eager's; bfloat16 model, float32 adapters as PEFT keeps them."""
    import memgraph
    from tests.helpers import compare_to_eager

    model = peft_model(torch.bfloat16).cuda()
    if weights == "nf4":
        memgraph.quantize_(model, "nf4")
    ids = ids_for(model).cuda()
    compiled = compare_to_eager(model, ids, {"rewrites": ["lora", "nf4"], "solver": "checkpoint"}, loss_rtol=1e-3,
                                grad_rtol=2e-2)
    assert compiled is not None


@pytest.mark.parametrize("solver", ["checkpoint", "offload-layers"])
def test_forward_halves_let_backward_recompute_xa_without_the_base_layer(solver):
    """The joint graph holds each adapter's forward as lora_project (xa = x @ A.T) and lora_apply (out = base +
    xa @ B.T): down_proj's output is read by the next layer alone, so a backward that recomputes the layer
    recomputes down_proj's xa from its input, not the base matmul under it nor lora_apply. The cost model's
    simulation matches the partitioned graphs, and training matches eager."""
    from memgraph import cost_model
    from memgraph.capture import capture
    from tests.helpers import compare_to_eager

    model = peft_model(torch.float32)
    ids = ids_for(model)
    (captured,) = capture(model, options={"codegen": "eager", "rewrites": ["lora"]}, solvers=(solver,),
                          input_ids=ids, labels=ids)
    joint = [n.target for n in captured.graph.joint.graph.nodes]
    assert LORA_LINEAR not in joint
    assert joint.count(torch.ops.memgraph.lora_project.default) == LAYERS * len(PROJECTIONS)
    assert joint.count(torch.ops.memgraph.lora_apply.default) == LAYERS * len(PROJECTIONS)
    part = captured.partitions[solver]
    backward = [n.target for n in part.bw.graph.nodes]
    recomputed_xa = backward.count(torch.ops.memgraph.lora_project.default)
    assert recomputed_xa > 0  # the solver recomputes layers
    # at most down_proj per layer goes without lora_apply (the last layer's output feeds the head, which backward
    # may recompute)
    assert recomputed_xa - LAYERS <= backward.count(torch.ops.memgraph.lora_apply.default) < recomputed_xa
    simulated = captured.costs.estimate(part.plan)
    partitioned = cost_model.estimate_partitioned(part.graph, part.fw, part.bw, codegen="eager")
    assert simulated.peak_bytes_hint == partitioned.peak_bytes_hint
    model.zero_grad(set_to_none=True)  # capture ran a backward
    compare_to_eager(model, ids, {"codegen": "inductor", "rewrites": ["lora"], "solver": solver},
                     loss_rtol=1e-5, grad_rtol=1e-4)


def test_split_forward_leaves_what_it_cannot_split_and_makes_only_the_halves_read():
    """A lora_linear whose tuple is read whole stays fused; one whose out nobody reads becomes lora_project alone;
    each half's value and eager input values are its own."""
    from memgraph.passes.lora import split_forward

    graph = torch.fx.Graph()
    base, x, a, b = (graph.placeholder(name) for name in ("base", "x", "a", "b"))
    whole = graph.call_function(LORA_LINEAR, (base, x, a, b, 2.0, False))
    only_xa = graph.call_function(LORA_LINEAR, (base, x, a, b, 2.0, False))
    xa = graph.call_function(operator.getitem, (only_xa, 1))
    graph.output((whole, xa))
    values = (torch.empty(3, 5), torch.empty(3, 4), torch.empty(2, 4), torch.empty(5, 2))
    for node in (whole, only_xa):
        node.meta["val"] = (torch.empty(3, 5), torch.empty(3, 2))
        node.meta["eager_input_vals"] = ((*values, 2.0, False), {})
        node.meta["stack_trace"] = "the adapter's line"
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert split_forward(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(LORA_LINEAR) == 1 and torch.ops.memgraph.lora_apply.default not in targets
    (project,) = [n for n in gm.graph.nodes if n.target is torch.ops.memgraph.lora_project.default]
    assert project.meta["val"].shape == (3, 2) and project.meta["stack_trace"] == "the adapter's line"
    assert project.meta["eager_input_vals"][0] == (values[1], values[2])
    inputs = [torch.randn(3, 5), torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 2)]
    (out, got_xa), want = gm(*inputs), torch.ops.memgraph.lora_linear(*inputs, 2.0, False)
    assert torch.equal(got_xa, want[1]) and torch.equal(out[0], want[0])
