"""One copy per host of the weights that stay in host memory, shared by the host's processes.

The streamed plans keep weights in pinned host memory for the whole run: ~20 GiB per process for
CogVideoX-5B, so 8 processes on a host would pin 160 GiB of the same bytes (more, in fact: the
pinned allocator rounds each tensor up to a power of two; measured 64.8 GiB peak for 2 processes,
docs/experiments/host_sharing.json). Here the lowest local rank that keeps a component on the host
loads it once into a memfd (an anonymous shared-memory file) and the others map that file: they
build the component empty, on the meta device, and never read it from disk. Each process then
page-locks its mapping (cudaHostRegister), so diffusers' group offloading finds the weights pinned
already and makes no copy of its own: one copy per host, measured 24.1 GiB peak for 2 processes.

A memfd is named in no filesystem: it needs no /dev/shm space (containers often get 64 MB), and
its memory goes back to the system when the last process using it exits, however it exits.
The processes find each other's files through /proc/<pid>/fd, coordinated by the process group's
store.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from batch_runner.cluster.cluster import HostPeers, Store
from batch_runner.errors import UserError

log = logging.getLogger(__name__)

ALIGNMENT = 4096  # each tensor starts on a page: aligned copies to the GPU are the fast ones
WAIT = timedelta(minutes=30)  # how long a process waits for another to load a component
MEMFD_PREFIX = "batch_runner-weights"


@dataclass(frozen=True)
class Slot:
    """Where one tensor of a component lives in its shared block."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _dtype(self.dtype).itemsize


# --- who shares what, and sharing it -------------------------------------------------------------


@dataclass
class SharedBlock:
    """One component's tensors, in one mapping of the host's shared file."""

    name: str
    data: torch.Tensor  # uint8, the whole mapping
    pinned: bool = False

    def pin(self) -> None:
        """Page-lock this process's mapping, so that copies to the GPU are asynchronous and fast."""
        if self.pinned or not torch.cuda.is_available():
            return
        cudart = torch.cuda.cudart()
        portable = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process
        error = cudart.cudaHostRegister(self.data.data_ptr(), self.data.numel(), portable)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of the shared {self.name} weights failed with CUDA error {error}")
        self.pinned = True


@dataclass
class HostSharing:
    """Which components this process shares with which others of its host, and the sharing itself."""

    peers: HostPeers
    groups: dict[str, list[int]]  # component -> the local ranks sharing it, the loader first
    timeout: timedelta = WAIT
    published: set[str] = field(default_factory=set)

    @classmethod
    def agree(cls, peers: HostPeers, wanted: Iterable[str], timeout: timedelta = WAIT) -> HostSharing:
        """Every process of the host says which components it wants to share; each is shared by those
        that want it, loaded by the lowest of them. Processes may want different ones (a process whose
        GPU has less free memory may pick a plan that keeps more on the host); a component only one
        process wants is not shared.
        """
        wanted = list(wanted)
        if peers.alone or not hasattr(os, "memfd_create"):  # memfds are Linux's
            return cls(peers, {}, timeout)
        prefix = f"host-weights/{peers.host}"
        peers.store.set(f"{prefix}/wants/{peers.local_rank}", json.dumps(wanted))
        keys = [f"{prefix}/wants/{rank}" for rank in range(peers.local_world_size)]
        peers.store.wait(keys, timeout)
        everyone = {rank: set(json.loads(peers.store.get(key))) for rank, key in enumerate(keys)}
        groups = {}
        for name in wanted:
            ranks = sorted(rank for rank, names in everyone.items() if name in names)
            if len(ranks) > 1:
                groups[name] = ranks
        return cls(peers, groups, timeout)

    @property
    def mapped(self) -> list[str]:
        """The components this process maps from another's copy: it builds them empty."""
        return [name for name, ranks in self.groups.items() if ranks[0] != self.peers.local_rank]

    @contextlib.contextmanager
    def reporting_failure(self) -> Iterator[None]:
        """If this process fails before publishing what it loads for others, they hear why at once."""
        try:
            yield
        except BaseException as e:
            for name, ranks in self.groups.items():
                if ranks[0] == self.peers.local_rank and name not in self.published:
                    self.peers.store.set(self._key(name), json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise

    def share(self, name: str, module: torch.nn.Module) -> SharedBlock:
        """Put `module`'s tensors in the host's one copy: filled here, or mapped from the loader's.

        The loader passes the loaded module, whose tensors move into the shared file one at a time
        (each private tensor is freed as soon as it is copied). The others pass the same module built
        on the meta device and receive views of the loader's file.
        """
        ranks, key = self.groups[name], self._key(name)
        if ranks[0] == self.peers.local_rank:
            block, description = _publish(module, name)
            self.peers.store.set(key, json.dumps(description))
            self.published.add(name)
            _wait_until_mapped(self.peers.store, key, len(ranks) - 1, name, self.timeout)
            os.close(description["fd"])
            return block
        self.peers.store.wait([key], self.timeout)
        description = json.loads(self.peers.store.get(key))
        if "error" in description:
            raise UserError(f"Local rank {ranks[0]} could not load {name} for this host: {description['error']}")
        try:
            return _attach(module, name, description)
        finally:  # mapped or refused, this process needs the loader's file no longer
            self.peers.store.add(f"{key}/done", 1)

    def _key(self, name: str) -> str:
        return f"host-weights/{self.peers.host}/{name}"


def _publish(module: torch.nn.Module, name: str) -> tuple[SharedBlock, dict[str, Any]]:
    slots = layout(module)
    size = max(ALIGNMENT, max((s.offset + s.nbytes for s in slots), default=0))
    fd = os.memfd_create(f"{MEMFD_PREFIX}-{name}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        data = _map(fd, size)
        for slot, (_, holders, tensor) in zip(slots, _owners(module), strict=True):
            view = _view(data, slot)
            view.copy_(tensor)
            del tensor
            _rebind(holders, view)
    except BaseException:
        os.close(fd)
        raise
    description = {
        "pid": os.getpid(),
        "fd": fd,
        "size": size,
        "slots": [[s.name, s.dtype, list(s.shape), s.offset] for s in slots],
    }
    log.info("shared %s on this host: %.2f GiB in one copy", name, size / 1024**3)
    return SharedBlock(name, data), description


def _attach(module: torch.nn.Module, name: str, description: dict[str, Any]) -> SharedBlock:
    slots = [Slot(n, d, tuple(s), o) for n, d, s, o in description["slots"]]
    expected = [(s.name, s.shape) for s in slots]
    mine = [(n, tuple(t.shape)) for n, t in _named_tensors(module)]
    if mine != expected:
        here, there = next((a, b) for a, b in itertools.zip_longest(mine, expected) if a != b)
        raise UserError(
            f"The processes on this host built different {name} models ({here} here, {there} in the loading "
            f"process); run them from one checkout and config, or set memory.share_host_weights=false."
        )
    path = f"/proc/{description['pid']}/fd/{description['fd']}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_PREFIX}-{name}"):
            raise OSError(f"{path} is not the shared {name} file")
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise UserError(
            f"Could not map the {name} weights another process on this host loaded ({e}); "
            f"set memory.share_host_weights=false to load a private copy in each process."
        ) from e
    try:
        data = _map(fd, description["size"])
    finally:
        os.close(fd)
    for slot, (_, holders, _) in zip(slots, _owners(module), strict=True):
        _rebind(holders, _view(data, slot))
    log.info("mapped %s from the copy process %d loaded on this host", name, description["pid"])
    return SharedBlock(name, data)


def _wait_until_mapped(store: Store, key: str, others: int, name: str, timeout: timedelta) -> None:
    """The loader keeps its file open until every other process has opened it through /proc."""
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"{key}/done", 0) < others:
        if time.monotonic() > deadline:
            log.warning("%s: not every process on this host mapped the shared weights in time", name)
            return
        time.sleep(0.05)


# --- tensors and their places ---------------------------------------------------------------------


def layout(module: torch.nn.Module) -> list[Slot]:
    """Every distinct tensor of `module` (parameters, then buffers) with its page-aligned offset."""
    slots, offset = [], 0
    for name, tensor in _named_tensors(module):
        slot = Slot(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset)
        slots.append(slot)
        offset += -(-slot.nbytes // ALIGNMENT) * ALIGNMENT
    return slots


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, _, tensor in _owners(module):
        yield name, tensor


Holder = tuple[torch.nn.Module, str, str]  # (module, "_parameters" or "_buffers", attribute)


def _owners(module: torch.nn.Module) -> Iterator[tuple[str, list[Holder], torch.Tensor]]:
    """Each distinct tensor once (parameters, then buffers): its first name, every place that holds
    it, and the tensor. Tied weights (a T5 encoder's embedding, say) then stay one tensor."""
    names: dict[int, str] = {}
    holders: dict[int, list[Holder]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for table in ("_parameters", "_buffers"):
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for attr, tensor in getattr(sub, table).items():
                if tensor is None:
                    continue
                key = id(tensor)
                if key not in holders:
                    names[key], holders[key], tensors[key] = f"{prefix}.{attr}" if prefix else attr, [], tensor
                holders[key].append((sub, table, attr))
    for key in list(holders):  # popped as they go, so that a rebound tensor can be freed at once
        yield names.pop(key), holders.pop(key), tensors.pop(key)


def _rebind(holders: list[Holder], data: torch.Tensor) -> None:
    """Point every holder of one tensor at `data` (a meta tensor cannot take it through `.data`)."""
    new = torch.nn.Parameter(data, requires_grad=False) if holders[0][1] == "_parameters" else data
    for sub, table, attr in holders:
        getattr(sub, table)[attr] = new


def _map(fd: int, size: int) -> torch.Tensor:
    return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)


def _view(data: torch.Tensor, slot: Slot) -> torch.Tensor:
    return data[slot.offset : slot.offset + slot.nbytes].view(_dtype(slot.dtype)).view(slot.shape)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
