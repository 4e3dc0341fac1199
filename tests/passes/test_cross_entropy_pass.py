"""The cross-entropy rewrite: HF's lm_head + causal-LM loss becomes memgraph.linear_cross_entropy in the captured
graph, with the loss and every gradient of eager (float32 rel err < 1e-5), for every head shape HF uses."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import memgraph
from memgraph.capture import capture
from memgraph.kernels import cross_entropy as ce
from memgraph.passes.cross_entropy import rewrite_cross_entropy

OP = torch.ops.memgraph.linear_cross_entropy.default
VOCAB = 100


def tiny(model_type: str, lora: bool = False, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                    attn_implementation="eager" if model_type == "gemma2" else "sdpa", use_cache=False)
    settings.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
        # PEFT starts B at zero (lora_A's first gradients are exactly zero): random B makes every gradient count
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    return model


def batch(seed: int = 0, rows: int = 2, length: int = 12, ignored_row: bool = True):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = ids.clone()
    labels[0, 3:7] = -100
    if ignored_row:
        labels[-1] = -100  # a row with no kept label
    return ids, labels


def step(model, ids, labels, **kwargs):
    output = model(input_ids=ids, labels=labels, **kwargs)
    output.loss.backward()
    module = getattr(model, "_orig_mod", model)
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return output, grads


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_like_eager(model, options, *, forced_chunks: bool = True, monkeypatch=None, **kwargs):
    """One training step eagerly and through the backend (eager codegen): equal loss, logits and gradients, and
    the captured graph ran the fused op."""
    ids, labels = batch()
    compiled_model = copy.deepcopy(model)
    want, want_grads = step(model, ids, labels, **kwargs)
    before = len(memgraph.compiled_graphs())
    compiled = torch.compile(compiled_model, backend="memgraph", options={"codegen": "eager", **options})
    got, grads = step(compiled, ids, labels, **kwargs)
    assert rel(got.loss, want.loss) < 1e-5, (float(got.loss), float(want.loss))
    assert grads.keys() == want_grads.keys()
    worst = max((rel(grads[n], g), n) for n, g in want_grads.items())
    assert worst[0] < 1e-5, worst
    records = memgraph.compiled_graphs()[before:]
    assert any("cross_entropy" in r.rewrites for r in records), [r.rewrites for r in records]
    return got, want, records


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 tokens: the tiny batches span several chunks, as long sequences do."""
    monkeypatch.setattr(ce, "MATMUL_EFFICIENT_TOKENS", 4)
    monkeypatch.setattr(ce, "CHUNK_ALIGN", 4)
    monkeypatch.setattr(ce, "DEFAULT_CHUNK_BYTES", 4 * VOCAB * 4)


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("qwen2", {}),
    ("gemma2", {"final_logit_softcapping": 3.0}),  # soft-capping (tanh(z / c) * c)
    ("cohere", {"logit_scale": 0.5}),  # logits * scale
    ("granite", {"logits_scaling": 4.0}),  # logits / scaling
    ("llama", {"tie_word_embeddings": True}),  # the embedding's weight is the lm_head's
], ids=["llama", "qwen2", "gemma2-softcap", "cohere-scale", "granite-scaling", "llama-tied"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loss_and_gradients_equal_eager(model_type, overrides, lora, small_chunks):
    model = tiny(model_type, lora, **overrides)
    got, want, _ = assert_like_eager(model, {})
    assert rel(got.logits, want.logits) < 1e-5  # kept by default, in the model's dtype


def test_gradient_accumulation_divides_by_num_items_in_batch(small_chunks):
    """HF Trainer's num_items_in_batch: a device tensor; the loss is the sum divided by it, as in eager."""
    model = tiny("llama", lora=True)
    assert_like_eager(model, {}, num_items_in_batch=torch.tensor(17))


def test_drop_logits_returns_empty_logits_and_the_same_loss(small_chunks):
    model = tiny("llama")
    got, _, records = assert_like_eager(model, {"drop_logits": True})
    assert got.logits.numel() == 0
    assert any("dropped" in note for r in records for note in r.notes)
    assert any("dropped" in note for r in records if r.plan is not None for note in r.plan.notes)


def test_the_joint_graph_holds_no_float32_logits():
    """No value of vocabulary size in float32 (the logits' upcast, its log-softmax, its gradient) in the captured
    joint graph of a bf16 model; without the rewrite there are several."""
    model = tiny("llama", lora=True).to(torch.bfloat16)
    ids, labels = batch()

    def vocabulary_sized(options):
        (captured,) = capture(copy.deepcopy(model), options=options, input_ids=ids, labels=labels)
        values = [n.meta.get("val") for n in captured.graph.joint.graph.nodes]
        return [v for v in values if isinstance(v, torch.Tensor) and v.dtype == torch.float32
                and v.numel() >= ids.numel() * VOCAB]

    assert len(vocabulary_sized({"rewrites": ("attention",)})) >= 2
    assert vocabulary_sized({"rewrites": ("attention", "cross_entropy")}) == []


@pytest.mark.parametrize("case", ["label_smoothing", "logits_used_in_graph"])
def test_unprovable_losses_are_left_alone_and_logged(case, caplog):
    """A loss the rewrite cannot prove (label smoothing here) or logits the graph uses elsewhere: unchanged,
    one log line, eager's results."""
    model = tiny("llama")
    ids, labels = batch()

    def step_fn(input_ids, labels):
        logits = model(input_ids=input_ids).logits
        flat = logits.float().view(-1, VOCAB)
        if case == "label_smoothing":
            return torch.nn.functional.cross_entropy(flat, labels.view(-1), label_smoothing=0.1)
        return torch.nn.functional.cross_entropy(flat, labels.view(-1)) + 1e-3 * logits.square().mean()

    want = step_fn(ids, labels)
    with caplog.at_level(logging.INFO, logger="memgraph.passes.cross_entropy"):
        got = torch.compile(step_fn, backend="memgraph", options={"codegen": "eager"})(ids, labels)
    assert rel(got, want) < 1e-6
    assert "left unchanged" in caplog.text
    assert all("cross_entropy" not in r.rewrites for r in memgraph.compiled_graphs()[-1:])


def test_rewrite_is_selectable_by_name():
    model = tiny("llama")
    ids, labels = batch()
    for selection, expected in ((("cross_entropy",), True), (("attention",), False)):
        (captured,) = capture(copy.deepcopy(model), options={"rewrites": selection}, input_ids=ids, labels=labels)
        ops = {n.target for n in captured.graph.joint.graph.nodes}
        assert (OP in ops) == expected and ("cross_entropy" in captured.rewrites) == expected


def test_chunk_size_follows_the_memory_budget():
    model = tiny("llama")
    ids, labels = batch()
    gm_chunks = []
    for budget in (2**30, 2**40):
        (captured,) = capture(copy.deepcopy(model), options={"rewrites": ("cross_entropy",), "memory_budget": budget,
                                                             "solver": "checkpoint"},
                              input_ids=ids, labels=labels)
        node = next(n for n in captured.graph.joint.graph.nodes if n.target is OP)
        gm_chunks.append(node.args[9])
    assert gm_chunks == [ce.chunk_tokens_for(VOCAB, torch.float32, b) for b in (2**30, 2**40)]
    assert gm_chunks[0] < gm_chunks[1]


def test_rewrite_never_raises_on_a_graph_without_a_loss():
    gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.cross_entropy(x, x.argmax(-1)))
    before = str(gm.graph)
    assert str(rewrite_cross_entropy(gm, [], memgraph.Options()).graph) == before
