"""``memgraph.compare`` and ``memgraph compare``: a row per (solver, budget), a markdown table, JSON and a
Pareto PNG; reference-size planning works on the meta device (no weights)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from memgraph import models
from memgraph.capture import capture
from memgraph.compare import add_compare_parser, compare
from memgraph.sources import training_model

SOLVERS = ["none", "checkpoint", "greedy", "ilp"]


def _tiny(layers: int = 2):
    return models.build("llama", lora=True, num_hidden_layers=layers, use_cache=False)


def test_compare_rows_table_json_png(tmp_path, capsys):
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    json_path, png_path = tmp_path / "rows.json", tmp_path / "pareto.png"
    rows = compare(model, example_kwargs={"input_ids": ids, "labels": ids}, budgets="auto:2", solvers=SOLVERS,
                   json_path=str(json_path), png_path=str(png_path), progress=False)
    budgets = sorted({r["budget_bytes"] for r in rows if r["solver"] == "ilp"})
    # two budgets from the checkpointing peak to the no-recompute peak (one if checkpointing saves nothing)
    assert 1 <= len(budgets) <= 2
    assert len(rows) == 1 + 3 * len(budgets)  # "none" ignores budgets: one row
    for row in rows:
        if row["solver"] == "none":
            assert row["budget_bytes"] is None and row["feasible"]
            continue
        if row["feasible"]:
            assert row["predicted_peak_bytes"] <= row["budget_bytes"]
            assert row["predicted_step_s"] >= row["predicted_recompute_s"] >= 0
        else:
            assert "smallest predicted-feasible peak" in row["error"]
    ilp = [r for r in rows if r["solver"] == "ilp"]
    assert all(r["feasible"] for r in ilp)  # budgets span checkpointing .. no recompute: the ILP meets them all
    table = capsys.readouterr().out
    assert "| solver | budget | predicted peak |" in table and "| ilp |" in table
    stored = json.loads(json_path.read_text())
    assert stored["rows"] == json.loads(json.dumps(rows, default=str))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_solver_fails_before_capture():
    with pytest.raises(ValueError, match="no solver named"):
        compare(lambda x: x, torch.ones(1), solvers=["nope"], progress=False, print_table=False)


def test_cli_plans_a_meta_model_without_weights(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    json_path = tmp_path / "cli.json"
    args = parser.parse_args(["compare", "--model", "llama", "--device", "meta", "--seq", "64", "--budgets",
                              "auto:2", "--solvers", "checkpoint,ilp", "--json", str(json_path), "--png",
                              str(tmp_path / "cli.png")])
    assert args.run(args) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert {r["solver"] for r in rows} == {"checkpoint", "ilp"}
    assert all(r["predicted_peak_bytes"] > 0 for r in rows if r["feasible"])
    assert "wrote" in capsys.readouterr().out


def test_meta_capture_has_no_real_storage():
    model = training_model("llama", lora=4)
    assert all(p.device.type == "meta" for p in model.parameters())
    ids = torch.zeros(1, 32, dtype=torch.long, device="meta")
    (captured,) = capture(model, input_ids=ids, labels=ids, use_cache=False, backward=False)
    graph = captured.graph
    assert graph.num_fwd_outputs >= 1 and graph.backward_nodes


def test_offload_option_reaches_the_budget_aware_solvers():
    """With offload="on" compare plans as the backend does: greedy may offload, so it reaches offload-layers' peak,
    below its leanest keep/recompute plan (where it fails without offload)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)).train()
    ids = torch.randint(0, 96, (1, 512), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "labels": ids}
    settings = {"example_kwargs": kwargs, "progress": False, "print_table": False, "solvers": ["greedy"]}
    offload = {"offload": "on", "codegen": "eager", "rewrites": False}
    lean = compare(model, example_kwargs=kwargs, budgets=[None], solvers=["offload-layers"], progress=False,
                   print_table=False, options=offload)
    budget = lean[0]["predicted_peak_bytes"]
    (without,) = compare(model, budgets=[budget], options={"codegen": "eager", "rewrites": False}, **settings)
    (with_offload,) = compare(model, budgets=[budget], options=offload, **settings)
    assert not without["feasible"]  # keep/recompute alone cannot get there
    assert with_offload["feasible"] and with_offload["predicted_peak_bytes"] <= budget
