"""Host offload of saved activations: the three ops a plan's transfers become in the forward/backward graphs.

Forward, after a saved value's last forward use::

    host = memgraph.offload(value)                      # D2H copy starts on the transfer stream
    ...                                                 # compute the copy hides behind
    host = memgraph.wait_transfer(host, keepalive=value) # compute stream waits; ``value`` dies after this

Backward, before the value's first use::

    value = memgraph.reload(host, device)                # H2D copy starts (the plan chooses how early)
    ...
    value = memgraph.wait_transfer(value, keepalive=host)  # ``host``'s pinned buffer goes back to the pool

Why it is safe without ``record_stream`` (which fragments the caching allocator): a copy's source and
destination are graph values that stay referenced until their ``wait_transfer`` (``keepalive`` is a data
dependency), and the wait makes the compute stream wait on the copy's event, so any later reuse of that memory
by the compute stream is ordered after the copy. One transfer stream per device runs every copy in order, so a
pinned buffer handed back to the pool by a reload's wait is never overwritten by a later offload before the
reload's copy ran. Host buffers come from a pool keyed by (numel, dtype): a step reuses the previous step's
buffers instead of paying ``cudaHostAlloc`` per tensor.

Under CUDA graphs (``Options.cudagraphs``) a replayed copy reads and writes the addresses it was captured with,
and a host tensor handed from forward to backward would split the captured step. There the pass uses the slot
ops instead::

    token = memgraph.offload_to_slot(value)             # D2H copy into a page-locked host buffer (a slot)
    token = memgraph.wait_captured_transfer(token, keepalive=value)
    ...
    value = memgraph.reload_from_slot(token)            # H2D copy from the token's slot
    value = memgraph.wait_captured_transfer(value, keepalive=token)

Forward hands backward a token, a device tensor of the value's shape and dtype over one element of storage, so
nothing on the host crosses a graph boundary and every op is captured. Each offload takes its own slot until its
reload, so several forwards may wait for their backwards (a loss over two forwards; cudagraph trees record each
as its own node). A slot taken while a CUDA graph is captured belongs to that graph for good: its replays copy
there. Other slots go back to a free list at their reload and are reused (the one transfer stream orders a later
offload's copy after the reload's).

Where the plan puts a reload or a wait is a decision (how far ahead to prefetch; how long a copy runs behind
compute), but Inductor's scheduler moves ops that nothing orders: its peak-memory reordering puts a wait right
after its copy, and fusing two kernels on either side of a wait (two layers' rotary embeddings, which read the same
tables) pulls the wait, and the copy's whole cost, ahead of the compute it was to hide behind. So the pass gives
``reload``, ``reload_from_slot`` and the waits ``after=``: the nearest matmul or custom op output before the op's
planned place (``transfers.tie_points``). That data dependency keeps the op from running earlier than that
output, and a fusion across it would form a cycle, which Inductor refuses. The ops never read ``after`` (so a
gradient summed in place into it stays correct). It does not stop a reload from running later than planned.

On a CPU the copies are real host copies (``clone``) and the waits are no-ops: CPU tests run the same graphs.
"""
from __future__ import annotations

import logging

import torch

from memgraph._compat import CUDAGRAPH_UNSAFE_TAGS
from memgraph.errors import MemgraphError

log = logging.getLogger("memgraph.offload")

__all__ = ["offload", "reload", "offload_to_slot", "reload_from_slot", "wait_transfer", "wait_captured_transfer",
           "release_host_buffers", "host_pool_bytes", "slot_bytes"]

_transfer_streams: dict[torch.device, torch.cuda.Stream] = {}
_pending: dict[int, torch.cuda.Event] = {}  # data_ptr of a copy's destination -> its completion event
_pool: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
_pooled: set[int] = set()  # data_ptrs of buffers the pool owns
_free_slots: list[torch.Tensor] = []  # page-locked byte buffers no captured graph uses, free for the next copy
_held_slots: dict[int, torch.Tensor] = {}  # data_ptr of a token -> the slot holding its value until the reload
_captured_slots: dict[int, torch.Tensor] = {}  # data_ptr -> a slot a CUDA graph captured copies with (for good)
_page_locked: dict[int, torch.Tensor] = {}  # data_ptr -> a slot registered with cudaHostRegister


def _transfer_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _transfer_streams.get(device)
    if stream is None:
        stream = _transfer_streams[device] = torch.cuda.Stream(device=device)
    return stream


def _pinned_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    bucket = _pool.get((numel, dtype))
    if bucket:
        return bucket.pop()
    try:
        buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
    except RuntimeError as error:  # pinned memory exhausted: pageable memory still works, the copy just blocks
        _warn_once(f"memgraph: pinned host memory could not be allocated ({error}); offloading into pageable "
                   "memory, whose copies are not hidden behind compute. Lower offload_budget.")
        buffer = torch.empty(numel, dtype=dtype)
    _pooled.add(buffer.data_ptr())
    return buffer


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _give_back(buffer: torch.Tensor) -> None:
    if buffer.data_ptr() in _pooled:
        flat = buffer.reshape(-1)
        _pool.setdefault((flat.numel(), flat.dtype), []).append(flat)


def release_host_buffers() -> None:
    """Free the pinned host buffers kept for the next step (e.g. when training ends); slots captured in CUDA
    graphs stay (their graphs' replays copy there)."""
    _pool.clear()
    _pooled.clear()
    for buffer in _free_slots:
        if _page_locked.pop(buffer.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())  # before its memory goes back to the host
    _free_slots.clear()


def host_pool_bytes() -> int:
    """Bytes of pinned host memory the pool holds between steps (the slots' are ``slot_bytes``)."""
    return sum(b.numel() * b.element_size() for bucket in _pool.values() for b in bucket)


def slot_bytes() -> int:
    """Bytes of page-locked host memory the slot ops hold: free, holding a value, or captured in a CUDA graph."""
    slots = {b.data_ptr(): b for b in (*_free_slots, *_held_slots.values(), *_captured_slots.values())}
    return sum(b.numel() for b in slots.values())


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _take_slot(token: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A slot for ``like``'s bytes, held for ``token`` until its reload, viewed as a contiguous tensor like it: the
    smallest free one that fits, else a new one (page-locked on a CUDA machine)."""
    nbytes = like.numel() * like.element_size()
    fitting = [k for k, b in enumerate(_free_slots) if b.numel() >= nbytes]
    if fitting:
        buffer = _free_slots.pop(min(fitting, key=lambda k: _free_slots[k].numel()))
    else:
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if like.device.type == "cuda":
            _page_lock(buffer)
    if _capturing(like.device):
        _captured_slots[buffer.data_ptr()] = buffer
    _held_slots[token.data_ptr()] = buffer
    return _viewed(buffer, like)


def _give_slot_back(token: torch.Tensor) -> torch.Tensor:
    """The slot holding ``token``'s value, viewed like it; free again unless a CUDA graph captured it."""
    buffer = _held_slots.pop(token.data_ptr(), None)
    if buffer is None:
        raise RuntimeError("memgraph: reload_from_slot got a token no offload_to_slot holds a copy for (each "
                           "offloaded value is reloaded once, by the backward of the forward that offloaded it)")
    if _capturing(token.device):
        _captured_slots[buffer.data_ptr()] = buffer
    if buffer.data_ptr() not in _captured_slots:
        _free_slots.append(buffer)
    return _viewed(buffer, token)


def _viewed(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return buffer[:like.numel() * like.element_size()].view(like.dtype).view(like.shape)


_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, as torch pins memory


def _page_lock(buffer: torch.Tensor) -> None:
    """Page-lock a slot's buffer in place (cudaHostRegister) for good. Not from torch's pinned-memory pool: the
    pool tracks each copy with events it later queries, which a copy captured into a CUDA graph never records;
    and a captured copy may not touch pageable memory."""
    error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), _HOST_REGISTER_PORTABLE)
    if int(error) != 0:
        raise MemgraphError(f"memgraph: {buffer.numel() / 2**30:.2f} GiB of host memory for an offloaded value "
                            f"could not be page-locked (cudaHostRegister error {int(error)}); lower offload_budget "
                            "or set cudagraphs=False")
    _page_locked[buffer.data_ptr()] = buffer


def _token(value: torch.Tensor) -> torch.Tensor:
    """A stand-in for ``value`` on its device: its shape and dtype over one element of storage."""
    return value.new_empty([1] * value.dim()).expand(value.shape)


def _copy_on_transfer_stream(destination: torch.Tensor, source: torch.Tensor, device: torch.device, *,
                             key: int | None = None) -> None:
    """Copy on the transfer stream; the event its ``wait_transfer`` waits on is found by ``key`` (the data_ptr
    of the tensor the wait gets: by default the destination)."""
    stream = _transfer_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the source is written, the destination free
    with torch.cuda.stream(stream):
        destination.copy_(source, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    _pending[destination.data_ptr() if key is None else key] = event


# Registered with torch.library's low-level API (define / impl / register_fake), as the LoRA, NF4 and attention ops
# are: torch.library.custom_op's generic per-call Python costs tens of µs, and a plan may offload a hundred values
# a step, each an offload and a reload. Schemas and tags are those custom_op produced. wait_transfer's output
# aliases ``tensor`` (custom_op forbids aliasing outputs), so its schema is written by hand in any case.
_library = torch.library.Library("memgraph", "FRAGMENT")
# Host copies on a side stream with events stay out of CUDA graphs (``Options.cudagraphs``).
_library.define("offload(Tensor value) -> Tensor", tags=(torch.Tag.pt2_compliant_tag, *CUDAGRAPH_UNSAFE_TAGS))
_library.define("reload(Tensor host, Device device, Tensor? after=None) -> Tensor",
                tags=(torch.Tag.pt2_compliant_tag, *CUDAGRAPH_UNSAFE_TAGS))
_library.define("wait_transfer(Tensor(a) tensor, Tensor? keepalive=None, Tensor? after=None) -> Tensor(a)",
                tags=CUDAGRAPH_UNSAFE_TAGS)
# The slot ops are captured: their copies' addresses stay fixed, and only device tensors cross graph boundaries.
# Their wait is captured with them (a wait inside a captured part for a copy outside it would be unordered).
_library.define("offload_to_slot(Tensor value) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_library.define("reload_from_slot(Tensor token, Tensor? after=None) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_library.define("wait_captured_transfer(Tensor(a) tensor, Tensor? keepalive=None, Tensor? after=None) -> Tensor(a)")


def _offload(value: torch.Tensor) -> torch.Tensor:
    if value.device.type != "cuda":
        return value.detach().clone()
    host = _pinned_buffer(value.numel(), value.dtype).view(value.shape)
    _copy_on_transfer_stream(host, value, value.device)
    return host


def _reload(host: torch.Tensor, device: torch.device, after: torch.Tensor | None = None) -> torch.Tensor:
    if device.type != "cuda":
        return host.detach().clone().to(device)
    value = torch.empty(host.shape, dtype=host.dtype, device=device)  # allocated on the compute stream
    _copy_on_transfer_stream(value, host, device)
    return value


def _offload_to_slot(value: torch.Tensor) -> torch.Tensor:
    token = _token(value)
    host = _take_slot(token, value)
    if value.device.type != "cuda":
        host.copy_(value)
    else:
        _copy_on_transfer_stream(host, value, value.device, key=token.data_ptr())
    return token


def _reload_from_slot(token: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
    host = _give_slot_back(token)
    value = torch.empty(token.shape, dtype=token.dtype, device=token.device)
    if token.device.type != "cuda":
        value.copy_(host)
    else:  # the slot may be taken again at once: the next copy into it queues behind this one
        _copy_on_transfer_stream(value, host, token.device)
    return value


_library.impl("offload", _offload, "CompositeExplicitAutograd")
_library.impl("reload", _reload, "CompositeExplicitAutograd")
_library.impl("offload_to_slot", _offload_to_slot, "CompositeExplicitAutograd")
_library.impl("reload_from_slot", _reload_from_slot, "CompositeExplicitAutograd")


@torch.library.register_fake("memgraph::offload")
def _(value: torch.Tensor) -> torch.Tensor:
    return torch.empty(value.shape, dtype=value.dtype, device="cpu")


@torch.library.register_fake("memgraph::reload")
def _(host: torch.Tensor, device: torch.device, after: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty(host.shape, dtype=host.dtype, device=device)


@torch.library.register_fake("memgraph::offload_to_slot")
def _(value: torch.Tensor) -> torch.Tensor:
    return _token(value)


@torch.library.register_fake("memgraph::reload_from_slot")
def _(token: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty(token.shape, dtype=token.dtype, device=token.device)


def offload(value: torch.Tensor) -> torch.Tensor:
    """Start copying ``value`` to (pinned) host memory; pair with ``wait_transfer(host, keepalive=value)``."""
    return torch.ops.memgraph.offload(value)


def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Start copying ``host`` back to ``device``; pair with ``wait_transfer(value, keepalive=host)``."""
    return torch.ops.memgraph.reload(host, device)


def _wait_transfer(tensor: torch.Tensor, keepalive: torch.Tensor | None = None,
                   after: torch.Tensor | None = None) -> torch.Tensor:
    event = _pending.pop(tensor.data_ptr(), None)
    if event is not None:
        device = keepalive.device if keepalive is not None and keepalive.is_cuda else tensor.device
        torch.cuda.current_stream(device).wait_event(event)
        if keepalive is not None and not keepalive.is_cuda:
            _give_back(keepalive)  # the H2D copy from this pinned buffer is ordered before any later offload
    return tensor


_library.impl("wait_transfer", _wait_transfer, "CompositeExplicitAutograd")
_library.impl("wait_captured_transfer", _wait_transfer, "CompositeExplicitAutograd")


def _waited(tensor: torch.Tensor, keepalive: torch.Tensor | None = None,
            after: torch.Tensor | None = None) -> torch.Tensor:
    return tensor


torch.library.register_fake("memgraph::wait_transfer", _waited)
torch.library.register_fake("memgraph::wait_captured_transfer", _waited)


def offload_to_slot(value: torch.Tensor) -> torch.Tensor:
    """Start copying ``value`` into a host slot; returns its token. Pair with
    ``wait_captured_transfer(token, keepalive=value)``."""
    return torch.ops.memgraph.offload_to_slot(value)


def reload_from_slot(token: torch.Tensor) -> torch.Tensor:
    """Start copying ``token``'s slot back to its device, in its shape and dtype; pair with
    ``wait_captured_transfer(value, keepalive=token)``."""
    return torch.ops.memgraph.reload_from_slot(token)


def wait_transfer(tensor: torch.Tensor, keepalive: torch.Tensor | None = None) -> torch.Tensor:
    """Make the compute stream wait for the copy that produced ``tensor``; ``keepalive`` (the copy's source)
    stays referenced until here."""
    return torch.ops.memgraph.wait_transfer(tensor, keepalive)


def wait_captured_transfer(tensor: torch.Tensor, keepalive: torch.Tensor | None = None) -> torch.Tensor:
    """``wait_transfer`` for the slot ops' copies, captured into CUDA graphs with them."""
    return torch.ops.memgraph.wait_captured_transfer(tensor, keepalive)


def _register() -> None:
    from torch.fx.node import has_side_effect

    from memgraph.cost_model.values import register_host_output

    # a wait is a sync point that must stay where the plan put it (dead-code elimination keeps it)
    has_side_effect(torch.ops.memgraph.wait_transfer.default)
    has_side_effect(torch.ops.memgraph.wait_captured_transfer.default)
    register_host_output(torch.ops.memgraph.offload.default)


_register()
