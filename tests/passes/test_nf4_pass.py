"""The NF4 pass: bitsandbytes 4-bit linears in Dynamo's graph become memgraph.nf4_linear (QLoRA, no code change)."""
import copy
import logging

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch._dynamo.backends.debugging import aot_eager  # noqa: E402

from memgraph import passes  # noqa: E402
from memgraph.passes.nf4 import rewrite_bnb_linears  # noqa: E402
from tests.helpers import tiny_llama_with_biases  # noqa: E402

NF4_LINEAR = (torch.ops.memgraph.nf4_linear, torch.ops.memgraph.nf4_linear.default)
LAYERS, LINEARS_PER_LAYER = 2, 7  # q, k, v, o, gate, up, down
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU bitsandbytes runs dequantize + F.linear exactly as we do, so results are bit-equal; on CUDA it may
# pick its own fused 4-bit GEMM for small M, which rounds differently.
EXACT = DEVICE == "cpu"
GRAD_TOLERANCE = 1e-6 if EXACT else 1e-3


def assert_same(actual, expected):
    if EXACT:
        assert torch.equal(actual, expected)
    else:
        assert torch.allclose(actual, expected, rtol=1e-3, atol=1e-4)


def tiny_llama(layers=LAYERS, **overrides):
    return tiny_llama_with_biases(layers, **overrides)


def to_bnb_4bit(model, *, quant_type="nf4", double_quant=True, weight_dtype=torch.float32,
                compute_dtype=torch.float32):
    """What from_pretrained(BitsAndBytesConfig(load_in_4bit=True, ...)) builds, without a download."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=quant_type)
            layer.weight = bnb.nn.Params4bit(child.weight.data.to(weight_dtype), requires_grad=False,
                                             quant_type=quant_type, compress_statistics=double_quant, module=layer)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, layer.to(DEVICE))
    return model.to(DEVICE)


def qlora(model):
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    return peft.get_peft_model(model, config)


def all_graph_nodes(gm):
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from module.graph.nodes


def bnb_nodes(gm):
    return [n for n in all_graph_nodes(gm) if isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "bitsandbytes"]


def capture(fn, *args, rewrite=False, **kwargs):
    """Run ``fn`` under torch.compile; return the Dynamo graphs (rewritten if asked) and the result.

    Each graph carries ``bnb_ops_before``: how many bitsandbytes ops Dynamo captured before any rewrite.
    """
    graphs = []

    def backend(gm, example_inputs):
        captured = len(bnb_nodes(gm))
        if rewrite:
            gm = rewrite_bnb_linears(gm, example_inputs, None)
        gm.bnb_ops_before = captured
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    result = torch.compile(fn, backend=backend)(*args, **kwargs)
    return graphs, result


@pytest.mark.parametrize("double_quant,bias", [(True, False), (False, True)])
def test_qlora_model_is_rewritten_and_trains_identically(double_quant, bias):
    model = qlora(to_bnb_4bit(tiny_llama(attention_bias=bias, mlp_bias=bias), double_quant=double_quant))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    loss_eager = model(input_ids=ids, labels=ids).loss
    loss_eager.backward()
    grads_eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    graphs, loss = capture(lambda **kw: model(**kw).loss, input_ids=ids, labels=ids, rewrite=True)
    (gm,) = graphs  # one graph: no graph breaks
    assert gm.bnb_ops_before > 0  # what Dynamo captured: bitsandbytes gemm/dequantize ops
    assert not bnb_nodes(gm)
    assert not any(n.target is torch.ops.higher_order.autograd_function_apply for n in gm.graph.nodes)
    rewritten = [n for n in gm.graph.nodes if n.target in NF4_LINEAR]
    assert len(rewritten) == LAYERS * LINEARS_PER_LAYER
    assert all(isinstance(n.meta.get("example_value"), torch.Tensor) for n in rewritten)  # later passes read it
    assert_same(loss, loss_eager.detach())
    loss.backward()
    assert grads_eager
    for name, param in model.named_parameters():
        if param.requires_grad:
            error = (param.grad - grads_eager[name]).norm() / grads_eager[name].norm()
            assert error < GRAD_TOLERANCE, name


class OneLayer(nn.Module):
    def __init__(self, **to_bnb):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        to_bnb_4bit(self, **to_bnb)

    def forward(self, x):
        return self.proj(x).square().sum()


def rewritten_copy_and_log(module, x, caplog):
    graphs, _ = capture(module, x)
    (gm,) = graphs
    before = str(gm.graph)
    with caplog.at_level(logging.INFO, logger="memgraph.passes.nf4"):
        out = rewrite_bnb_linears(copy.deepcopy(gm), [], None)
    return before, out, caplog.text


def test_fp4_is_left_unchanged(caplog):
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    before, gm, text = rewritten_copy_and_log(OneLayer(quant_type="fp4"), x, caplog)
    assert str(gm.graph) == before and bnb_nodes(gm)
    assert "fp4" in text


def test_weight_rounded_to_another_dtype_is_left_unchanged(caplog):
    # bf16 weights with float32 compute: bitsandbytes' backward rounds W to bf16 first; ours would not.
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    before, gm, text = rewritten_copy_and_log(OneLayer(weight_dtype=torch.bfloat16), x, caplog)
    assert str(gm.graph) == before
    assert "rounds W to torch.bfloat16" in text


def test_inference_gemm_is_rewritten():
    module = OneLayer()
    x = torch.randn(3, 64, device=DEVICE)  # no grad needed: bitsandbytes calls gemm_4bit directly
    with torch.no_grad():
        graphs, expected = capture(module, x, rewrite=True)
    (gm,) = graphs
    assert not bnb_nodes(gm) and sum(n.target in NF4_LINEAR for n in gm.graph.nodes) == 1
    assert_same(expected, module(x))


def test_other_autograd_functions_are_untouched():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    graphs, _ = capture(lambda x: Double.apply(x).sum(), torch.randn(4, requires_grad=True))
    (gm,) = graphs
    before = str(gm.graph)
    assert str(rewrite_bnb_linears(gm, [], None).graph) == before


def test_registered_as_rewrite():
    assert passes._load(passes.REWRITES["nf4"]) is rewrite_bnb_linears


@pytest.mark.slow
def test_qlora_recipe_through_memgraph_backend(caplog):
    """The standard QLoRA model under backend="memgraph": rewritten, compiled, same gradients as eager."""
    model = qlora(to_bnb_4bit(tiny_llama(layers=1)))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="memgraph"):
        torch.compile(model, backend="memgraph")(input_ids=ids, labels=ids).loss.backward()
    assert f"{LINEARS_PER_LAYER} bitsandbytes 4-bit linear(s) -> memgraph.nf4_linear" in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("memgraph") and r.levelno >= logging.WARNING]
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert (param.grad - eager[name]).norm() / eager[name].norm() < 1e-3, name


def test_capture_step_applies_the_named_rewrites():
    """The planner's capture path (``capture_step(rewrites=("nf4",))``) plans the rewritten graph: the joint
    graph holds memgraph.nf4_dequantize (the weights of memgraph.nf4_linear, ``expose_dequantized_weights``) and no
    bitsandbytes op, and the planned step's loss equals eager's."""
    from memgraph.capture import capture
    from memgraph.cost_model.tracker import MemoryTracker, run_step

    torch.manual_seed(0)
    model = qlora(to_bnb_4bit(tiny_llama()))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=DEVICE)
    (captured,) = capture(model, solvers=("none",), options={"rewrites": ("nf4",)}, input_ids=ids, labels=ids)
    targets = {n.target for n in captured.graph.joint.graph.nodes if n.op == "call_function"}
    assert torch.ops.memgraph.nf4_dequantize.default in targets
    assert torch.ops.memgraph.nf4_linear.default not in targets
    # bitsandbytes' packed weight reaches the dequantize through a uint8 view of the parameter: still never saved
    dequantized = [n for n in captured.graph.joint.graph.nodes if n.target is torch.ops.memgraph.nf4_dequantize.default]
    assert len(captured.costs.never_saved) == sum(captured.graph.is_forward(n) for n in dequantized) > 0
    assert not [t for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace == "bitsandbytes"]
    part = captured.partitions["none"]
    step = run_step(part.fw, part.bw, captured.primals, part.graph.num_fwd_outputs, tracker=MemoryTracker())
    expected = model(input_ids=ids, labels=ids).loss
    loss = next(o for o in step.user_outputs if isinstance(o, torch.Tensor) and o.dim() == 0)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-5)
