"""Switching a model's attention to one of attnconv's functions for one block of work.

transformers looks attention functions up by name in a process-wide registry (`AttentionInterface`), and mask
builders in another. attnconv registers each of its functions under its own name only while a block uses it
(counted, so nested or concurrent blocks share the registration), and puts the model's own implementation back
afterwards: nothing outlives the block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_LOCK = threading.Lock()
_USERS: dict[str, int] = {}


@contextmanager
def registered(name: str, function: Callable, mask_function: Callable | None = None) -> Iterator[None]:
    """`name` maps to `function` in transformers' attention registry (and to `mask_function` in its mask
    registry) within this block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    with _LOCK:
        if _USERS.get(name, 0) == 0:
            AttentionInterface.register(name, function)
            if mask_function is not None:
                ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_function)
        _USERS[name] = _USERS.get(name, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS[name] -= 1
            if _USERS[name] == 0:
                AttentionInterface._global_mapping.pop(name, None)
                if mask_function is not None:
                    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


@contextmanager
def attention_implementation(model, name: str, function: Callable,
                             mask_function: Callable | None = None) -> Iterator[bool]:
    """Run MODEL's attention through `function` (registered as `name`) within this block; yields whether the
    model switched (a model without `set_attn_implementation` stays as it was)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation"):
        yield False
        return
    with registered(name, function, mask_function):
        model.set_attn_implementation(name)
        switched = config._attn_implementation == name
        try:
            yield switched
        finally:
            if switched:
                model.set_attn_implementation(previous)


@contextmanager
def instance_forwards(modules: list, make_forward: Callable) -> Iterator[int]:
    """Within this block each module's `forward` is `make_forward(module, its own forward)`, set on the instance
    (the class and other models are untouched) and deleted after; modules already patched are left alone.
    Yields how many were patched."""
    modules = [m for m in modules if "forward" not in m.__dict__]
    for module in modules:
        module.forward = make_forward(module, module.forward)
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward
