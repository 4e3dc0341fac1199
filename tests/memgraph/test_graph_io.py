"""Saving a training graph's structure and loading it elsewhere: the same graph for the cost model and the
solvers, clear errors for what cannot be saved or is not a saved graph."""
from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.fx as fx

from memgraph import models
from memgraph.cost_model import graph_costs
from memgraph.capture import capture
from memgraph.errors import MemgraphError
from memgraph.graph import TrainingGraph
from memgraph.graph_io import load_graph, save_graph

from tests.helpers import NO_REWRITES


@pytest.fixture(scope="module")
def captured():
    torch._dynamo.reset()
    model = models.build("llama", lora=True, num_hidden_layers=2, use_cache=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    (step,) = capture(model, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    return step


def test_a_loaded_graph_plans_like_the_captured_one(captured, tmp_path):
    path = save_graph(captured.graph, tmp_path / "step.json.gz")
    loaded = load_graph(path)
    original = [(n.name, n.op, str(n.target)) for n in captured.graph.joint.graph.nodes]
    assert [(n.name, n.op, str(n.target)) for n in loaded.joint.graph.nodes] == original
    assert loaded.num_fwd_outputs == captured.graph.num_fwd_outputs
    assert loaded.static_input_indices == captured.graph.static_input_indices
    want, got = graph_costs(captured.graph), graph_costs(loaded)
    for saved in (want.save_least, want.save_all):
        same = got.indices(want.names_of(saved))
        assert got.peak(same) == want.peak(saved)
        assert got.recompute_seconds(same) == pytest.approx(want.recompute_seconds(saved))


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "other.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"format": "something-else"}, file)
    with pytest.raises(MemgraphError, match="not a saved training graph"):
        load_graph(path)


def test_python_callables_are_not_saved(tmp_path):
    graph = fx.Graph()
    x = graph.placeholder("primals_1")
    graph.output((graph.call_function(torch.relu, (x,)),))
    joint = fx.GraphModule(torch.nn.Module(), graph)
    x.meta["val"] = torch.empty(4, device="meta")
    training = TrainingGraph.__new__(TrainingGraph)  # skip canonicalization: only the saving is under test
    training.joint, training.example_inputs, training.num_fwd_outputs = joint, [[x.meta["val"]], []], 1
    training.static_input_indices = ()
    with pytest.raises(MemgraphError, match="not a torch.ops operator"):
        save_graph(training, tmp_path / "bad.json.gz")


def test_compare_plans_a_saved_graph_without_the_model(captured, tmp_path):
    from memgraph import compare

    path = save_graph(captured.graph, tmp_path / "step.json.gz")
    rows = compare(str(path), budgets=["auto:2"], solvers=["checkpoint", "ilp"], progress=False, print_table=False)
    assert {r["solver"] for r in rows} == {"checkpoint", "ilp"} and all(r["feasible"] for r in rows)
    assert not any("step_s" in r for r in rows)
    with pytest.raises(ValueError, match="needs the model"):
        compare(str(path), solvers=["ilp"], measure=True, progress=False, print_table=False)


def test_several_graphs_are_saved_beside_the_given_path(captured, tmp_path):
    from memgraph.compare import _save_graphs

    (tmp_path / "run.d").mkdir()
    _save_graphs([captured.graph, captured.graph], str(tmp_path / "run.d" / "step.json.gz"))
    assert sorted(p.name for p in (tmp_path / "run.d").iterdir()) == ["step-0.json.gz", "step-1.json.gz"]
    assert len(load_graph(tmp_path / "run.d" / "step-1.json.gz").joint.graph.nodes) == len(
        captured.graph.joint.graph.nodes)
