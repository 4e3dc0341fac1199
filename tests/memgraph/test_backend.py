"""End to end: torch.compile(model, backend="memgraph") trains HF causal LMs with eager's loss and gradients."""
import importlib.metadata

import pytest
import torch

import memgraph
from memgraph import models
from tests.helpers import compare_to_eager, lm_step, relative_error

FAMILIES = list(models.TINY)


def _ids(model, batch=2, seq=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)


def test_backend_is_discovered_through_entry_point():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "memgraph" in names
    assert "memgraph" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_codegen_matches_eager(family, lora):
    model = models.build(family, lora=lora)
    compare_to_eager(model, _ids(model), {"codegen": "eager", "solver": "mincut"})


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_codegen_matches_eager(family, lora):
    model = models.build(family, lora=lora)
    compare_to_eager(model, _ids(model), {"codegen": "inductor", "solver": "mincut"})


@pytest.mark.parametrize("solver", ["none", "mincut"])
def test_every_baseline_solver_gives_eager_gradients(solver):
    model = models.build("llama", lora=True)
    compiled = compare_to_eager(model, _ids(model), {"codegen": "eager", "solver": solver})
    plan = memgraph.compiled_graphs()[-1].plan
    assert plan.solver == solver and plan.saved
    assert compiled is not None


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_second_sequence_length_recompiles_correctly(codegen):
    model = models.build("llama", lora=True)
    reference = models.build("llama", lora=True)
    compiled = torch.compile(model, backend="memgraph", options={"codegen": codegen})
    for seq in (16, 24, 40):
        ids = _ids(model, seq=seq, seed=seq)
        loss, grads = lm_step(compiled, ids)
        ref_loss, ref_grads = lm_step(reference, ids)
        assert abs(float(loss) - float(ref_loss)) <= 1e-4 * abs(float(ref_loss))
        assert max(relative_error(grads[n], g) for n, g in ref_grads.items()) < 1e-3


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_dropout_masks_equal_eager_under_same_seed(codegen):
    model = models.build("gpt2", resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3).train()
    compare_to_eager(model, _ids(model), {"codegen": codegen, "solver": "mincut"}, seed=7)


def test_dropout_actually_changes_the_loss():
    """Guards the test above: with dropout active, two seeds give different losses."""
    model = models.build("gpt2", resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3).train()
    ids = _ids(model)
    torch.manual_seed(1)
    first = model(input_ids=ids, labels=ids).loss
    torch.manual_seed(2)
    second = model(input_ids=ids, labels=ids).loss
    assert float(first) != float(second)


def test_graph_break_still_trains_correctly(caplog):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    def step(x):
        h = torch.tanh(layers[0](x))
        print("side effect forces a graph break")  # noqa: T201
        return torch.sigmoid(layers[1](h)).sum()

    x = torch.randn(4, 8)
    step(x).backward()
    expected = [p.grad.clone() for p in layers.parameters()]
    layers.zero_grad()
    before = len(memgraph.compiled_graphs())
    torch.compile(step, backend="memgraph", options={"codegen": "eager"})(x).backward()
    for p, g in zip(layers.parameters(), expected):
        assert relative_error(p.grad, g) < 1e-6
    assert len(memgraph.compiled_graphs()) - before == 2  # one graph each side of the break


def test_pipeline_failure_falls_back_to_eager_with_a_log(monkeypatch, caplog):
    from memgraph import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler bug")

    monkeypatch.setattr(pipeline, "compile_graph", broken)
    model = models.build("llama")
    with caplog.at_level("WARNING", logger="memgraph"):
        compare_to_eager(model, _ids(model), {"codegen": "eager"}, expect_fallback=True)
    assert "simulated compiler bug" in caplog.text and "running it eagerly" in caplog.text


def test_solver_failure_falls_back_to_default_partition(monkeypatch, caplog):
    from memgraph.cost_model import solvers

    def broken_solver(graph, estimate, budget, **_):
        raise RuntimeError("solver exploded")

    solvers.register("broken-for-test", replace=True)(broken_solver)
    model = models.build("llama")
    with caplog.at_level("WARNING", logger="memgraph"):
        compare_to_eager(model, _ids(model), {"codegen": "eager", "solver": "broken-for-test"}, expect_fallback=True)
    assert "solver exploded" in caplog.text
    assert memgraph.compiled_graphs()[-1].plan.solver == "none"


def test_options_typo_is_a_clear_error():
    model = models.build("llama")
    compiled = torch.compile(model, backend="memgraph", options={"solvr": "none"})
    ids = _ids(model)
    with pytest.raises(Exception, match=r"unknown option\(s\) \['solvr'\].*valid options are"):
        compiled(input_ids=ids, labels=ids)


def test_plan_rejects_non_callables():
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        memgraph.plan(42)


def test_inference_only_calls_work():
    model = models.build("llama")
    ids = _ids(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = torch.compile(model, backend="memgraph", options={"codegen": "eager"})(input_ids=ids).logits
    assert relative_error(actual, expected) < 1e-5
