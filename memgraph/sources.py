"""Where a model comes from, and the training setup built from it, for ``plan``, ``compare`` and ``fit``.

A model source is one of:

* a name of ``memgraph.models`` (``llama3-8b``, ``qwen2.5-7b``, the tiny ``llama`` ...);
* a local directory holding a ``config.json`` (weights are never loaded);
* a Hugging Face Hub id whose config is already in the local cache (nothing is downloaded).

``training_model(source, weights=..., lora=...)`` builds the model as a user trains it, on the ``meta`` device by
default (shapes and dtypes only: an 8B model plans on a laptop): ``weights`` "bf16" (frozen base in bf16), "nf4"
(``memgraph.quantize_``: the NF4 storage of the real sizes) or "bnb" (bitsandbytes 4-bit; the graph rewrite turns
it into the same NF4 ops, so on the meta device it is planned as "nf4"); ``lora`` a LoRA rank on every projection,
or None for full fine-tuning.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from memgraph.errors import MemgraphError

__all__ = ["model_config", "training_model", "example_batch", "WEIGHTS"]

WEIGHTS = ("bf16", "nf4", "bnb")
_FORMS = ("a memgraph.models name ({names}), a local directory holding config.json, or a Hugging Face Hub id "
          "already in the local cache")


def model_config(source: str, **overrides: Any):
    """The transformers config of a model source (see the module docstring); ``MemgraphError`` names the three
    forms when ``source`` is none of them."""
    from memgraph import models

    if source in models.available():
        return models.config(source, **overrides)
    from transformers import AutoConfig

    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise MemgraphError(f"{source!r} is a directory without a config.json; a model source is "
                                + _FORMS.format(names=", ".join(models.available())))
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    else:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, HFValidationError
            raise MemgraphError(f"unknown model {source!r} ({type(error).__name__}); a model source is "
                                + _FORMS.format(names=", ".join(models.available()))) from None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def training_model(source: str, *, weights: str = "bf16", lora: int | None = 16, device: str = "meta",
                   dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> torch.nn.Module:
    """The model of ``source`` set up for training (random weights; see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from memgraph import models

    if weights not in WEIGHTS:
        raise MemgraphError(f"weights={weights!r} is not supported; choose one of {list(WEIGHTS)}")
    if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int) or lora < 1):
        raise MemgraphError(f"lora must be a rank >= 1 or None (full fine-tuning); got {lora!r}")
    config = model_config(source, use_cache=False, **overrides)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if weights != "bf16" or lora is not None:
        model.requires_grad_(False)
    if weights == "bnb" and device != "meta":
        models.to_bnb_4bit(model)
    elif weights in ("nf4", "bnb"):
        import memgraph

        memgraph.quantize_(model, "nf4")
    if lora is not None:
        model = models.add_lora(model, rank=lora)
    elif weights != "bf16":
        raise MemgraphError("full fine-tuning (lora=None) trains every weight: it needs weights='bf16'")
    return model.train()


def example_batch(model: torch.nn.Module, batch: int, seq: int, device: str = "meta") -> dict[str, torch.Tensor]:
    """input_ids and labels of one batch (zeros on the meta device, where they have no values anyway)."""
    if device == "meta":
        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


# --- the command line's side: one set of arguments for plan, compare and fit --------------------------------------
def add_training_arguments(parser, *, seq: int | None, weights: str, lora: int | None) -> None:
    """--model SOURCE, --weights, --lora R / --full, --kv-bits, --batch, --seq, --device, and the backend options
    (--solver, --memory-budget, --rewrites, --drop-logits) that decide the captured graph and its plan."""
    from memgraph import models

    parser.add_argument("--model", default="llama", help="a memgraph.models name (" + ", ".join(models.available())
                        + "), a local directory holding config.json, or a cached Hugging Face Hub id")
    parser.add_argument("--weights", default=weights, choices=WEIGHTS,
                        help="frozen base weights: bf16, nf4 (memgraph.quantize_) or bnb (bitsandbytes 4-bit)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lora", type=int, default=lora, metavar="R", help=f"LoRA rank on every projection "
                       f"(default {lora if lora else 'none: full fine-tuning'})")
    group.add_argument("--full", action="store_true", help="full fine-tuning (every weight trains; bf16 only)")
    parser.add_argument("--kv-bits", type=int, default=16, choices=[16, 8, 4])
    if seq is not None:
        parser.add_argument("--seq", type=int, default=seq)
        parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one, else meta: no weights), "
                                                         "meta, cpu, cuda")
    parser.add_argument("--rewrites", default=None, help="comma-separated rewrites (default: all), or 'none'")
    parser.add_argument("--drop-logits", action="store_true", help="the chunked cross-entropy returns no logits")
    parser.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                        help="saved values may wait in host memory (auto: on CUDA graphs; fit: always unless off)")
    parser.add_argument("--offload-budget", default=None, help="host memory offload may use (default: half free)")


def training_options(args) -> dict[str, Any]:
    """The backend options the training arguments set."""
    options: dict[str, Any] = {"kv_bits": args.kv_bits, "drop_logits": args.drop_logits, "offload": args.offload,
                               "offload_budget": args.offload_budget}
    if args.rewrites is not None:
        options["rewrites"] = False if args.rewrites.strip().lower() == "none" else args.rewrites
    return options


def training_subject(args) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """(model, inputs, device) of the training arguments."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "meta"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = training_model(args.model, weights=args.weights, lora=None if args.full else args.lora, device=device,
                           dtype=dtype)
    return model, example_batch(model, args.batch, args.seq, device), device
