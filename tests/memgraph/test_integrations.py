"""HF Trainer reaches the backend through TrainingArguments(torch_compile_backend="memgraph")."""
import pytest
import torch

import memgraph
from memgraph import models


class _RandomTokens(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def test_trainer_with_torch_compile_backend_memgraph(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("MEMGRAPH_CODEGEN", "eager")  # Trainer passes no options: the environment reaches us
    model = models.build("llama", lora=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, torch_compile=True,
        torch_compile_backend="memgraph", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    before = len(memgraph.compiled_graphs())
    result = transformers.Trainer(model=model, args=args, train_dataset=_RandomTokens()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    records = memgraph.compiled_graphs()[before:]
    assert records and all(r.options.codegen == "eager" and r.plan is not None for r in records)
