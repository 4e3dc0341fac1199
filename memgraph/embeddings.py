"""``memgraph.offload_embeddings_(model)``: a frozen input embedding lives in host memory, and a step sends the GPU
only the rows it looks up (``memgraph.kernels.host_embedding``).

A backend cannot do this by itself: the parameter belongs to the module, and the compiled graph receives it
wherever the module keeps it. Like ``quantize_``, this changes the module in place, before ``torch.compile``:

    memgraph.quantize_(model, "nf4")
    memgraph.offload_embeddings_(model)      # Llama-3-8B: 1 GiB less on the GPU for the whole step
    step = torch.compile(model, backend="memgraph")

The planner counts the table as host memory (the graph reads it only through ``memgraph.host_embedding``), and
``memgraph fit`` weighs the same choice when it plans with offload. Kept as they are, with a log line: a trainable
embedding (its gradient would need the table on the GPU), one whose weight is shared (tied to the lm_head, which
reads all of it every step), and ``nn.Embedding`` options other than ``padding_idx`` (``max_norm`` renormalizes
the table in place; sparse gradients). ``model.to(...)`` leaves the host table where and as it is.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from memgraph.kernels.host_embedding import TABLE_DTYPES, host_embedding

log = logging.getLogger("memgraph.embeddings")

__all__ = ["HostEmbedding", "offload_embeddings_"]


class HostEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose table is a parameter in (pinned, when a GPU exists) host memory."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        table = embedding.weight.detach()
        planning = table.device.type == "meta"  # memgraph fit: the values are never read, nothing is pinned
        host = torch.empty(table.shape, dtype=table.dtype, device="cpu",
                           pin_memory=torch.cuda.is_available() and not planning)
        if not planning:
            host.copy_(table)
        self.weight = nn.Parameter(host, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return host_embedding(ids, self.weight)

    def _apply(self, fn, recurse=True):
        # model.to(device / dtype) must not bring the table back to the GPU: it stays in host memory as it is.
        table = self._parameters.pop("weight")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = table

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host memory ({self.weight.dtype})"


def offload_embeddings_(model: nn.Module) -> Optional[HostEmbedding]:
    """Move ``model``'s frozen input embedding (``get_input_embeddings()``) to host memory in place; returns the
    ``HostEmbedding`` installed, or None (with the reason logged) when the embedding must stay."""
    embedding = _input_embedding(model)
    reason = _why_it_stays(model, embedding)
    if reason is not None:
        log.warning("memgraph.offload_embeddings_: the input embedding stays on its device: %s", reason)
        return None
    host = HostEmbedding(embedding)
    parent, name = _owner(model, embedding)
    setattr(parent, name, host)
    log.info("memgraph.offload_embeddings_: %s (%d x %d %s, %.2f GiB) now in host memory", name,
             host.num_embeddings, host.embedding_dim, host.weight.dtype, host.weight.nbytes / 2**30)
    return host


def _input_embedding(model: nn.Module) -> Optional[nn.Module]:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _why_it_stays(model: nn.Module, embedding: Optional[nn.Module]) -> Optional[str]:
    if isinstance(embedding, HostEmbedding):
        return "it is already in host memory"
    if type(embedding) is not nn.Embedding:
        return f"the model's get_input_embeddings() is {type(embedding).__name__}, not a torch.nn.Embedding"
    if embedding.weight.requires_grad:
        return "it trains (freeze it first, e.g. get_peft_model or requires_grad_(False))"
    if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
        return "it uses max_norm, sparse or scale_grad_by_freq"
    if embedding.weight.dtype not in TABLE_DTYPES:
        return f"its dtype {embedding.weight.dtype} is not one of {TABLE_DTYPES}"
    shared = sum(p is embedding.weight for _, p in model.named_parameters(remove_duplicate=False))
    if shared > 1:
        return "its weight is shared with another module (tied to the lm_head, which reads all of it every step)"
    return None


def _owner(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for name, module in parent.named_children():
            if module is child:
                return parent, name
    raise ValueError("the input embedding is not a submodule of the model")
