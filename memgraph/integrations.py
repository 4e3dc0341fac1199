"""Make ``TrainingArguments(torch_compile=True, torch_compile_backend="memgraph")`` work.

HF ``Trainer`` hands the backend name to accelerate's ``TorchDynamoPlugin``, which accepts only the members of
its ``DynamoBackend`` enum and later calls ``torch.compile(backend=name.lower())``. ``import memgraph`` adds a
``MEMGRAPH`` member so the name passes that check; torch then finds the backend through its entry point.
"""
from __future__ import annotations

import logging

log = logging.getLogger("memgraph")

BACKEND_NAME = "MEMGRAPH"


def register_with_accelerate() -> bool:
    """Add ``MEMGRAPH`` to accelerate's ``DynamoBackend``; False when accelerate is absent or changed shape."""
    try:
        from accelerate.utils.dataclasses import DynamoBackend
    except Exception:  # noqa: BLE001 - accelerate is optional; any import problem just means no Trainer hook
        return False
    if BACKEND_NAME in DynamoBackend.__members__:
        return True
    try:
        member = str.__new__(DynamoBackend, BACKEND_NAME)
        member._name_ = BACKEND_NAME
        member._value_ = BACKEND_NAME
        member.__objclass__ = DynamoBackend
        DynamoBackend._member_map_[BACKEND_NAME] = member
        DynamoBackend._value2member_map_[BACKEND_NAME] = member
        DynamoBackend._member_names_.append(BACKEND_NAME)
        type.__setattr__(DynamoBackend, BACKEND_NAME, member)
    except Exception as error:  # noqa: BLE001 - an accelerate release with another enum layout
        log.warning("memgraph: could not register with accelerate (%s); pass a compiled model to Trainer instead",
                    error)
        return False
    return DynamoBackend(BACKEND_NAME) is member
