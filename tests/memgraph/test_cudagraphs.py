"""``Options.cudagraphs``: the compiled graphs replayed from CUDA graphs (Inductor's cudagraph trees)."""
import copy

import pytest
import torch

import memgraph
from memgraph import _compat, models
from memgraph.errors import MemgraphError
from memgraph.kernels._dispatch import persistent_tensor
from memgraph.options import env_settings, resolve_options
from tests.helpers import relative_error, trainable_grads


def test_cudagraphs_needs_inductor_codegen():
    assert resolve_options({"cudagraphs": True}).cudagraphs
    with pytest.raises(MemgraphError, match="codegen='inductor'"):
        resolve_options({"cudagraphs": True, "codegen": "eager"})
    with pytest.raises(MemgraphError, match="True or False"):
        resolve_options({"cudagraphs": "yes please"})


def test_cudagraphs_from_the_environment():
    assert env_settings({"MEMGRAPH_CUDAGRAPHS": "1"}) == {"cudagraphs": True}
    assert env_settings({"MEMGRAPH_CUDAGRAPHS": "off"}) == {"cudagraphs": False}
    with pytest.raises(MemgraphError, match="MEMGRAPH_CUDAGRAPHS"):
        env_settings({"MEMGRAPH_CUDAGRAPHS": "maybe"})


@pytest.mark.skipif(not _compat.CUDAGRAPH_UNSAFE_TAGS, reason="this torch has no cudagraph_unsafe tag")
def test_host_tensor_ops_stay_out_of_cuda_graphs_and_slot_ops_go_in():
    import memgraph.kernels.host_embedding  # noqa: F401 - registers the op
    import memgraph.kernels.offload  # noqa: F401

    for op in (torch.ops.memgraph.offload, torch.ops.memgraph.reload, torch.ops.memgraph.wait_transfer,
               torch.ops.memgraph.host_embedding):
        assert torch.Tag.cudagraph_unsafe in op.default.tags, op
    # what the offload pass uses under cudagraphs is captured: slots in host memory, device tokens across graphs
    for op in (torch.ops.memgraph.offload_to_slot, torch.ops.memgraph.reload_from_slot,
               torch.ops.memgraph.wait_captured_transfer):
        assert torch.Tag.cudagraph_unsafe not in op.default.tags, op


def test_cudagraph_patches_name_real_inductor_settings():
    from torch._inductor import config as inductor_config

    patches = _compat.cudagraph_config_patches()
    assert patches["triton.cudagraphs"] is True
    with inductor_config.patch(patches):  # an unknown name raises here
        assert inductor_config.triton.cudagraphs


def test_persistent_tensor_on_the_cpu_is_made_in_place():
    made = persistent_tensor(lambda: torch.arange(4), torch.device("cpu"))
    assert torch.equal(made, torch.arange(4))


@pytest.mark.cuda
def test_persistent_tensor_raises_the_helpers_error():
    def fails():
        raise ValueError("no table")

    with pytest.raises(ValueError, match="no table"):
        persistent_tensor(fails, torch.device("cuda"))  # raised in the helper thread


def test_cudagraphs_on_a_cpu_graph_train_like_eager(caplog):
    """Inductor graphs nothing on a CPU; the option changes nothing there but one log line (and costs no error)."""
    import logging

    from memgraph import pipeline

    pipeline._logged.clear()
    caplog.set_level(logging.INFO, logger="memgraph")
    model = models.build("llama", lora=True)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="memgraph", options={"cudagraphs": True, "cache": False})
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    assert abs(float(loss) - float(expected)) <= 1e-4 * abs(float(expected))
    grads, reference_grads = trainable_grads(compiled), trainable_grads(reference)
    assert max(relative_error(grads[n], g) for n, g in reference_grads.items()) < 1e-3
    assert "cudagraphs=True has nothing to capture" in caplog.text


def _sgd_losses(model, step_model, ids, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


@pytest.mark.cuda
def test_graphed_qlora_steps_with_offload_train_like_eager():
    """NF4 matmuls (a cached code table), LoRA split reductions (cached arrival counters), the embedding in host
    memory and offloaded layer inputs (both left out of the graphs), replayed over several SGD steps: the
    losses of eager's. Kernel-kept tensors made inside the graphs' pool would fail the replay's pool check."""
    model = models.build("llama", lora=True, device="cuda", dtype=torch.bfloat16)
    memgraph.quantize_(model, "nf4")
    memgraph.offload_embeddings_(model)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 256), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    options = {"cudagraphs": True, "solver": "offload-layers", "offload": "on", "cache": False}
    compiled = torch.compile(model, backend="memgraph", options=options)
    graphed = _sgd_losses(model, compiled, ids, steps=4)  # warm-up, recording, then replays
    expected = _sgd_losses(reference, reference, ids, steps=4)
    plan = memgraph.compiled_graphs()[-1].plan
    assert plan is not None and plan.offloaded, "the plan offloads nothing: the test misses the host ops"
    for step, (a, b) in enumerate(zip(graphed, expected)):
        assert abs(a - b) <= 2e-2 * abs(b), (step, a, b)  # bf16 model, NF4 matmuls in a different order


@pytest.mark.cuda
def test_offloads_are_captured_in_the_cuda_graphs(monkeypatch):
    """Under cudagraphs the offloaded values' copies are part of the captured step: replays issue none from
    Python, and a replayed step on new tokens gives eager's gradients (each backward reloads its own forward's
    values, not a previous step's)."""
    from memgraph.kernels import offload

    model = models.build("llama", lora=True, device="cuda", dtype=torch.float32)
    with torch.no_grad():  # PEFT starts B at zero, which makes every gradient of A zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    reference = copy.deepcopy(model)
    generator = torch.Generator("cuda").manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (1, 256), device="cuda", generator=generator)
               for _ in range(4)]
    options = {"cudagraphs": True, "solver": "offload-layers", "offload": "on", "cache": False}
    compiled = torch.compile(model, backend="memgraph", options=options)

    def step(step_model, ids):
        step_model(input_ids=ids, labels=ids).loss.backward()

    for ids in batches[:2]:  # warm-up, recording
        step(compiled, ids)
        model.zero_grad(set_to_none=True)
    copies = []
    original = offload._copy_on_transfer_stream
    monkeypatch.setattr(offload, "_copy_on_transfer_stream", lambda *a, **k: copies.append(1) or original(*a, **k))
    for ids in batches[2:]:  # replays, each on tokens it has not seen
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        step(compiled, ids)
        step(reference, ids)
        grads, expected = trainable_grads(compiled), trainable_grads(reference)
        assert max(relative_error(grads[n], g) for n, g in expected.items()) < 1e-3
    assert memgraph.compiled_graphs()[-1].plan.offloaded
    assert not copies, f"{len(copies)} copies issued from Python during replays: the offloads were not captured"
