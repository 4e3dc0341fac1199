"""Compiles that hit torch's caches with memgraph's key: the same options reuse the compiled code and the stored
plan; a changed budget or kv_bits misses and plans again."""
from __future__ import annotations

import pytest
import torch

import memgraph
from memgraph import compile_cache, models
from memgraph.options import Options


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return tmp_path


def _compile_step(model, ids, options):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="memgraph", options=options)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    record = memgraph.compiled_graphs()[-1]
    return record, float(loss), dict(counters["aot_autograd"])


def test_same_options_hit_changed_budget_or_kv_bits_miss(cache_dir):
    model = models.build("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, use_cache=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    options = {"solver": "checkpoint", "memory_budget": 2**30}
    cold, cold_loss, counts = _compile_step(model, ids, options)
    assert cold.cache == "miss" and counts.get("autograd_cache_saved") == 1
    assert list((cache_dir / "memgraph" / "plans").glob("*.json"))  # the plan is stored beside the code
    warm, warm_loss, counts = _compile_step(model, ids, options)
    assert warm.cache == "hit" and counts.get("autograd_cache_hit") == 1
    assert warm.plan == cold.plan and warm_loss == cold_loss  # the stored plan, the same compiled step
    for changed in ({"memory_budget": 2**30 + 1}, {"kv_bits": 4}):
        record, loss, counts = _compile_step(model, ids, {**options, **changed})
        assert record.cache == "miss" and counts.get("autograd_cache_miss") == 1, changed
        assert record.plan.budget_bytes == changed.get("memory_budget", 2**30)
    record, _, counts = _compile_step(model, ids, {**options, "cache": False})
    assert record.cache is None and "autograd_cache_hit" not in counts


def test_key_covers_what_decides_the_plan():
    base = Options(solver="checkpoint", memory_budget="1GiB")
    key = compile_cache.options_key(base)
    assert compile_cache.options_key(Options(solver="checkpoint", memory_budget="1GiB", report="x")) == key
    for other in (Options(solver="greedy", memory_budget="1GiB"), Options(solver="checkpoint", memory_budget="2GiB"),
                  Options(solver="checkpoint", memory_budget="1GiB", rewrites=("nf4",)),
                  Options(solver="checkpoint", memory_budget="1GiB", codegen="eager")):
        assert compile_cache.options_key(other) != key
    assert len(compile_cache.code_version()) == 16
