"""This process's place among the processes that `accelerate launch` started.

accelerate's PartialState owns the process group; we add what a long batch run needs on top:
a shared counter (the process group's own TCPStore) for claims and progress, and a wait for the
other processes that polls that counter instead of entering a collective barrier, which would
time out while a slow process still makes its last video; and the processes of one host, which
can share one copy of the weights in host memory (batch_runner.replica.host_weights).

A rendezvous is only a host and a port: a process of another run (another manifest, output_dir or
config, or a process of an earlier launch on that port) could meet this run there. The processes
compare their run keys through the store before anything is made, and each claim checks that the
store still belongs to the launch its process joined.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from batch_runner import upstream
from batch_runner.cluster.sharding import Counter, LocalCounter, poll_delays
from batch_runner.errors import UserError

log = logging.getLogger(__name__)


class Store(Protocol):
    """What sharing needs of the process group's key-value store (a c10d Store has all of it)."""

    def set(self, key: str, value: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def add(self, key: str, amount: int) -> int: ...

    def wait(self, keys: list[str], timeout: timedelta) -> None: ...

    def check(self, keys: list[str]) -> bool: ...


@dataclass(frozen=True)
class HostPeers:
    """This process among the processes of its host: who can share host memory with whom."""

    local_rank: int
    local_world_size: int
    store: Store | None  # None when this process is alone on its host
    host: str  # the same for exactly the processes that can map each other's memory

    @property
    def alone(self) -> bool:
        return self.store is None or self.local_world_size < 2


def this_host() -> str:
    """A name that two processes share only if they run on one machine, under one kernel boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}-{boot}"


RUN_KEY = "run-key"
LAUNCH_KEY = "run-launch"


def rendezvous() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


class LaunchMismatch(UserError):
    """Processes that met at one rendezvous are not one launch of one run. Every process prints it:
    on several hosts each host's terminal (or job log) is the only one its user reads."""

    every_rank = True


class SameLaunch:
    """The claim counter, refusing a process whose launch is no longer the one the store serves."""

    def __init__(self, store: Store, launch: str) -> None:
        self.store = store
        self.launch = launch

    def add(self, key: str, amount: int) -> int:
        # check() before get(): a store without the key would make get() wait for it.
        if not self.store.check([LAUNCH_KEY]) or self.store.get(LAUNCH_KEY).decode() != self.launch:
            raise LaunchMismatch(
                f"This process (pid {os.getpid()}) belongs to an earlier launch than the run now at the "
                f"rendezvous {rendezvous()}, so it stops instead of claiming that run's rows."
            )
        return self.store.add(key, amount)


@dataclass
class Cluster:
    state: PartialState
    counter: Counter
    launch: str = ""

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world_size(self) -> int:
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def local_rank(self) -> int:
        return self.state.local_process_index

    @property
    def local_world_size(self) -> int:
        """Processes on this host: they share its RAM (and, under --cpu, its cores)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def agree_on_run(self, key: str) -> None:
        """Go on only if every process of the rendezvous runs with this run key (see module docstring).

        Every process publishes its key and reads all the others', so that all refuse together (a
        process left waiting for a refused one would wait out a collective's timeout).
        """
        if not self.distributed:
            return
        store = self.counter
        if self.is_main:
            store.set(LAUNCH_KEY, uuid.uuid4().hex)
        store.set(f"{RUN_KEY}/{self.rank}", key)
        names = [f"{RUN_KEY}/{rank}" for rank in range(self.world_size)]
        store.wait([*names, LAUNCH_KEY])
        keys = [store.get(name).decode() for name in names]
        strangers = [rank for rank, other in enumerate(keys) if other != keys[0]]
        if strangers:
            ranks = ", ".join(map(str, strangers))
            raise LaunchMismatch(
                f"Process rank(s) {ranks} at the rendezvous {rendezvous()} were started for another run "
                "(a different manifest, output_dir or config) than rank 0, so none of them runs; give each run "
                "its own accelerate launch --main_process_port, and start every machine of one run with the "
                "same command."
            )
        self.launch = store.get(LAUNCH_KEY).decode()

    def claims(self) -> Counter:
        """The counter to claim rows with: it checks, before each claim, that this launch still owns the store."""
        if not self.distributed or not self.launch:
            return self.counter
        return SameLaunch(self.counter, self.launch)  # type: ignore[arg-type]

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def finish_and_wait(self, key: str = "finished", poll_seconds: float = 1.0, on_poll: Any = None) -> None:
        """Say this process is done, then wait until all are (no collective, so no timeout), asking
        the store at sharding.poll_delays' waits, up to `poll_seconds` apart."""
        self.counter.add(key, 1)
        delays = poll_delays(poll_seconds)
        while self.counter.add(key, 0) < self.world_size:
            if on_poll is not None:
                on_poll()
            time.sleep(next(delays))

    def host_peers(self) -> HostPeers:
        """The processes this one can share host memory with (the store is the process group's).

        Without LOCAL_WORLD_SIZE (set by torchrun, so by `accelerate launch`) this process cannot
        know which others run on its host, and shares with none.
        """
        store = self.counter if self.distributed and "LOCAL_WORLD_SIZE" in os.environ else None
        return HostPeers(self.local_rank, self.local_world_size, store, this_host())  # type: ignore[arg-type]

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            self.state.destroy_process_group()


def join_cluster(cpu: bool = False) -> Cluster:
    """Start (or join) the process group accelerate describes in the environment."""
    state = PartialState(cpu=cpu)
    counter: Counter = LocalCounter()
    if state.num_processes > 1:
        counter = upstream.default_store()
    return Cluster(state=state, counter=counter)
