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


class _VariableLengthTokens(torch.utils.data.Dataset):
    """Sequences of 5 to 16 tokens: a padding collator gives every batch an attention_mask with padding."""

    def __len__(self):
        return 32

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        length = int(torch.randint(5, 17, (1,), generator=generator))
        return {"input_ids": torch.randint(1, 128, (length,), generator=generator)}


def _pad_right(examples, length=16):
    """HF's padding-collator output, padded to a fixed bucket (one shape for every batch: no recompiles)."""
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n], mask[row, :n] = example["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_trainer_padded_batches_with_gradient_accumulation_match_eager(tmp_path, monkeypatch):
    """Padding collator, batch 4, gradient_accumulation_steps=4: Trainer passes num_items_in_batch (loss = sum /
    tokens over the 4 micro-batches); memgraph's losses equal eager's, the padded batch runs the fused attention
    (the mask becomes segments), and the 8 micro-batches compile once."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("MEMGRAPH_CODEGEN", "eager")
    histories = {}
    for name, backend in (("eager", None), ("memgraph", "memgraph")):
        torch._dynamo.reset()
        before = len(memgraph.compiled_graphs())
        model = models.build("llama", lora=True, seed=0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=4,
            max_steps=2, learning_rate=1e-3, torch_compile=backend is not None, torch_compile_backend=backend,
            report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_VariableLengthTokens(),
                                       data_collator=_pad_right)
        trainer.train()
        histories[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        records = memgraph.compiled_graphs()[before:]
    assert len(histories["eager"]) == 2
    for eager, ours in zip(histories["eager"], histories["memgraph"], strict=True):
        assert abs(ours - eager) <= 1e-4 * abs(eager), histories
    assert len(records) == 1, [r.options for r in records]  # one graph for all 8 micro-batches
    assert "attention" in records[0].rewrites


def _word_tokenizer():
    """A word-level tokenizer with pad/eos tokens (the datasets below are already token ids)."""
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    backend = Tokenizer(token_models.WordLevel({t: i for i, t in enumerate(specials.values())}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _sft_losses(tmp_path, backend, packing: bool, loss_type: str, device: str) -> tuple[list[float], list]:
    """Logged training losses of TRL's SFTTrainer on 24 token sequences of 5-16 tokens, and the memgraph
    graphs compiled meanwhile."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    sequences = [_VariableLengthTokens()[i]["input_ids"].tolist() for i in range(24)]
    torch._dynamo.reset()
    before = len(memgraph.compiled_graphs())
    model = models.build("llama", lora=True, seed=0).to(device)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / f"{backend}-{packing}-{loss_type}"), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, max_length=32, packing=packing,
        loss_type=loss_type, torch_compile=backend is not None, torch_compile_backend=backend, report_to=[],
        save_strategy="no", logging_steps=1, seed=0, data_seed=0, use_cpu=device == "cpu", bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=_word_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict({"input_ids": sequences}))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, memgraph.compiled_graphs()[before:]


@pytest.mark.cuda
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_trl_sft_trainer_matches_eager(tmp_path, monkeypatch, packing, loss_type):
    """TRL's SFTTrainer with torch_compile_backend="memgraph", padded (no packing) or packed (padding-free
    position_ids), with its default "nll" and its "dft" loss: the logged losses equal eager's. CUDA only: TRL 1.15
    computes the loss with a Triton kernel of its own (its fused LM head), which Dynamo cannot trace under the
    CPU's Triton interpreter."""
    monkeypatch.setenv("MEMGRAPH_CODEGEN", "eager")
    eager, _ = _sft_losses(tmp_path, None, packing, loss_type, "cuda")
    ours, records = _sft_losses(tmp_path, "memgraph", packing, loss_type, "cuda")
    assert len(eager) == 3 and records and all(r.plan is not None for r in records)
    for reference, value in zip(eager, ours, strict=True):
        assert abs(value - reference) <= 1e-3 * abs(reference), (eager, ours)
