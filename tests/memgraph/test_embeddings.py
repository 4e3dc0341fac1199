"""memgraph.offload_embeddings_: a frozen input embedding in host memory, gathered by memgraph.host_embedding; the
step trains as eager does, and the cost model counts the table as host memory, not device memory."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import memgraph
from memgraph.embeddings import HostEmbedding
from memgraph.kernels.host_embedding import host_embedding
from tests.helpers import compare_to_eager, tiny_llama_with_biases


def frozen_llama_with_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama_with_biases(2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                  "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (2, 7), (3, 1, 4)])
def test_gather_equals_embedding(dtype, shape):
    table = torch.randn(50, 40).to(dtype)
    ids = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(host_embedding(ids, table), nn.functional.embedding(ids, table))
    torch.library.opcheck(torch.ops.memgraph.host_embedding.default, (ids, table))


def test_bad_tables_and_ids_are_refused():
    with pytest.raises(ValueError, match="need a table"):
        host_embedding(torch.zeros(3, dtype=torch.long), torch.zeros(4, 5, 6))
    with pytest.raises(ValueError, match="ids must be int64 or int32"):
        host_embedding(torch.zeros(3), torch.zeros(4, 5))


def test_offloaded_model_trains_as_eager():
    model = frozen_llama_with_lora()
    reference = copy.deepcopy(model)
    host = memgraph.offload_embeddings_(model)
    assert isinstance(host, HostEmbedding) and model.get_input_embeddings() is host
    assert torch.equal(host.weight, reference.get_input_embeddings().weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    eager = reference(input_ids=ids, labels=ids).loss
    assert torch.equal(model(input_ids=ids, labels=ids).loss, eager)  # eagerly
    compare_to_eager(model, ids, {"codegen": "eager"}, loss_rtol=1e-6, grad_rtol=1e-5)  # and compiled


def test_to_leaves_the_table_in_host_memory():
    model = frozen_llama_with_lora()
    host = memgraph.offload_embeddings_(model)
    model.to(torch.float64)
    assert host.weight.dtype == torch.float32 and host.weight.device.type == "cpu"


def test_the_cost_model_counts_the_table_as_host_memory():
    """The same step planned with the table on the device and in host memory: the weights at the peak differ by
    exactly the table's bytes."""
    from memgraph.capture import capture

    weights = {}
    for where in ("device", "host"):
        model = frozen_llama_with_lora()
        if where == "host":
            memgraph.offload_embeddings_(model)
        ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        (captured,) = capture(model, options={"codegen": "eager"}, solvers=("none",), input_ids=ids, labels=ids)
        weights[where] = captured.costs.estimate(captured.plan).breakdown["weights"]
    table = model.get_input_embeddings().weight
    assert weights["device"] - weights["host"] == table.numel() * table.element_size()


@pytest.mark.parametrize("change, reason", [
    (lambda m: m.get_input_embeddings().weight.requires_grad_(True), "it trains"),
    (lambda m: setattr(m.get_input_embeddings(), "max_norm", 1.0), "max_norm"),
    (lambda m: setattr(m.get_output_embeddings(), "weight", m.get_input_embeddings().weight), "tied"),
])
def test_embeddings_that_must_stay_are_left_with_a_warning(change, reason, caplog):
    model = frozen_llama_with_lora()
    change(model)
    with caplog.at_level(logging.WARNING, logger="memgraph.embeddings"):
        assert memgraph.offload_embeddings_(model) is None
    assert reason in caplog.text and type(model.get_input_embeddings()) is nn.Embedding


@pytest.mark.cuda
def test_gpu_reads_the_pinned_table_without_a_copy():
    table = torch.randn(1000, 256, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, 1000, (4, 300), device="cuda")
    before = torch.cuda.memory_allocated()
    rows = host_embedding(ids, table)
    assert rows.device.type == "cuda"
    assert torch.cuda.memory_allocated() - before == rows.numel() * rows.element_size()  # no table on the GPU
    assert torch.equal(rows.cpu(), nn.functional.embedding(ids.cpu(), table))
