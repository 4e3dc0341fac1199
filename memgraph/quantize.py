"""``memgraph.quantize_(model, "nf4")``: frozen linear weights become NF4 in place (torchao-style).

Every frozen ``nn.Linear`` (weight ``requires_grad=False``) is replaced by an :class:`NF4Linear` holding the
weight in bitsandbytes' NF4 storage (packed nibbles + absmax, double-quantized by default) and calling
``torch.ops.memgraph.nf4_linear``. The float weight is dropped, so its memory is freed once nothing else
refers to it. Kept as they are: trainable linears (LoRA adapters, unfrozen layers), the output embedding
(``lm_head``, unless ``include_lm_head=True``), linears whose weight is shared with another module (tied),
and linear *subclasses* that override ``forward``. Embeddings are not linears and are never touched.

Any ``in_features`` works: bitsandbytes' blocks run over the flattened weight, so a block may straddle two
rows and no shape has to be rejected or skipped.

PEFT, both orders:
- quantize, then ``get_peft_model``: ``NF4Linear`` subclasses ``nn.Linear`` (with ``in_features``,
  ``out_features``, ``bias`` and a ``weight`` attribute that is the packed uint8 storage, as bitsandbytes'
  ``Linear4bit`` does), so PEFT's default dispatch wraps it in ``lora.Linear``; ``compute_dtype`` tells PEFT
  which float dtype the adapters use. Merging adapters into an NF4 weight is not supported (it would need a
  re-quantization); PEFT's merge raises on the uint8 storage instead of silently doing nothing.
- ``get_peft_model``, then quantize: the frozen ``base_layer`` of every PEFT tuner layer is quantized; the
  adapters (and any other module inside a tuner layer, e.g. ``modules_to_save`` copies) are left alone.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from memgraph.kernels.nf4 import NF4_BLOCKSIZE, VALID_BLOCKSIZES, NF4Weight

log = logging.getLogger("memgraph.quantize")

__all__ = ["quantize_", "NF4Linear", "FORMATS"]

FORMATS = ("nf4",)

# Buffers of an NF4Linear, in state_dict order; their dtypes are part of the format and never cast.
_BUFFERS = ("nf4_packed", "nf4_absmax", "nf4_nested_absmax", "nf4_nested_code", "nf4_nested_offset")


class NF4Linear(nn.Linear):
    """A frozen linear whose weight is stored as NF4 (bitsandbytes layout); ``y = x Wᵀ + b``.

    Subclasses ``nn.Linear`` so that code keyed on it (PEFT's LoRA dispatch, HF helpers) treats it as a linear
    layer, but holds no float weight: ``weight`` is the packed uint8 storage, like bitsandbytes' Params4bit.
    """

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.blocksize = weight.blocksize
        self.nested_blocksize = weight.nested_blocksize
        self.compute_dtype = compute_dtype or weight.dtype  # PEFT reads this to pick the adapters' dtype
        self.register_buffer("nf4_packed", weight.packed)
        self.register_buffer("nf4_absmax", weight.absmax)
        self.register_buffer("nf4_nested_absmax", weight.nested_absmax)
        self.register_buffer("nf4_nested_code", weight.nested_code)
        self.register_buffer("nf4_nested_offset", weight.nested_offset)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> "NF4Linear":
        weight = NF4Weight.quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias, compute_dtype=linear.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:  # the packed storage, as bitsandbytes' Linear4bit exposes it
        return self.nf4_packed

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.nf4_packed, self.nf4_absmax, (self.out_features, self.in_features),
                         self.compute_dtype, self.blocksize, self.nf4_nested_absmax, self.nf4_nested_code,
                         self.nf4_nested_offset, self.nested_blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # as F.linear under autocast
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = torch.ops.memgraph.nf4_linear(x, self.nf4_packed, self.nf4_absmax, self.nf4_nested_absmax,
                                          self.nf4_nested_code, self.nf4_nested_offset, self.out_features,
                                          self.in_features, self.blocksize, self.nested_blocksize)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def reset_parameters(self) -> None:
        raise RuntimeError("NF4Linear holds a frozen quantized weight; it cannot be re-initialized")

    def _apply(self, fn, recurse=True):
        # model.to(dtype)/.half() must move the NF4 storage but never cast it (absmax is float32 by format).
        stash = {name: self._buffers.pop(name) for name in _BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in stash.items():
                if tensor is not None:
                    moved = fn(tensor)
                    tensor = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
                self._buffers[name] = tensor
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=nf4, blocksize={self.blocksize}, double_quant={self.nf4_nested_absmax is not None}")


def _tuner_layer_type():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return BaseTunerLayer


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear computing F.linear with a float weight (subclasses with their own forward are left alone)."""
    return (isinstance(module, nn.Linear) and not isinstance(module, NF4Linear)
            and type(module).forward is nn.Linear.forward
            and isinstance(module.weight, nn.Parameter) and type(module.weight) is nn.Parameter
            and module.weight.dtype.is_floating_point and module.weight.dim() == 2)


def quantize_(model: nn.Module, format: str = "nf4", *, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True,
              include_lm_head: bool = False, skip: Iterable[str] = (),
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Quantize the frozen linear layers of ``model`` in place; returns ``model``.

    format: "nf4" (bitsandbytes-compatible NormalFloat4).
    blocksize: elements per absmax (bitsandbytes' block sizes; 64 as in QLoRA).
    double_quant: also quantize absmax to 8 bits (bitsandbytes' compress_statistics; ~0.37 bit/param less).
    include_lm_head: also quantize the output embedding (kept in full precision by default).
    skip: fnmatch patterns of module names to keep (e.g. ``["*.mlp.down_proj"]``).
    filter_fn: ``(module, name) -> bool``; only modules it accepts are quantized (torchao-style).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; valid formats are {list(FORMATS)}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not supported; choose one of {list(VALID_BLOCKSIZES)}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip)

    output_embedding = None
    if not include_lm_head and hasattr(model, "get_output_embeddings"):
        try:
            output_embedding = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_embedding = None
    weight_uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        weight_uses[id(parameter)] = weight_uses.get(id(parameter), 0) + 1
    # Inside a PEFT tuner layer only its base_layer is ours: adapters (even frozen ones) and other copies stay.
    tuner_type = _tuner_layer_type()
    peft_owned: set[int] = set()
    if tuner_type is not None:
        for tuner in (m for m in model.modules() if isinstance(m, tuner_type)):
            peft_owned.update(id(m) for n, m in tuner.named_modules()
                              if n and n != "base_layer" and not n.startswith("base_layer."))

    replacements: list[tuple[nn.Module, str, str, nn.Linear]] = []
    trainable = 0
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not _plain_linear(child) or id(child) in peft_owned:
                continue
            if child.weight.requires_grad:
                trainable += 1
                continue
            if child is output_embedding:
                log.info("memgraph.quantize_: keeping output embedding %s (include_lm_head=False)", name)
                continue
            if weight_uses.get(id(child.weight), 0) > 1:
                log.info("memgraph.quantize_: keeping %s: its weight is shared with another module", name)
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
                continue
            if filter_fn is not None and not filter_fn(child, name):
                continue
            replacements.append((parent, child_name, name, child))

    count = len(replacements)
    replacements.reverse()
    while replacements:  # pop as we go: each float weight is freed as soon as its layer is quantized
        parent, child_name, name, linear = replacements.pop()
        setattr(parent, child_name, NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant))
        log.debug("memgraph.quantize_: %s -> NF4 (%d x %d)", name, linear.out_features, linear.in_features)
        del linear
    if not count:
        log.warning("memgraph.quantize_: no frozen nn.Linear found%s; freeze the base weights first "
                    "(e.g. get_peft_model or requires_grad_(False))",
                    f" ({trainable} trainable linears skipped)" if trainable else "")
    else:
        log.info("memgraph.quantize_: %d linear layers -> NF4 (%d trainable linears kept)", count, trainable)
    return model
