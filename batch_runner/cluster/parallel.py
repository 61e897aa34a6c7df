"""Replicas of several GPUs: `replica.gpus=k` makes each video on k processes at once.

`accelerate launch --num_processes N` starts N processes; with `replica.gpus=k` they form N / k
replicas of k consecutive ranks (replica i is ranks i*k ... i*k+k-1). Within a replica:

* every process builds the whole pipeline (weights are replicated: context parallelism splits
  activations, not weights) and diffusers' context parallelism (`enable_parallelism` with a
  `ContextParallelConfig`, Ulysses or ring attention) splits each video's token sequence across
  the k processes;
* only the first process (the leader) claims rows, from the same store-based claims as
  independent processes, and broadcasts each claimed chunk to the others over the replica's own
  process group; all k run the pipeline on the same row with the same seed, and only the leader
  writes the video and its result;
* the leader says "done" (a broadcast of None) once the claims are exhausted, and its members
  leave with it. A stop signal reaches every process, as without replicas.

Every process creates every replica's group, in the same order (torch.distributed's rule for
new_group), and one DeviceMesh of shape (replicas, ring, ulysses) whose (ring, ulysses) slice is
its replica's mesh: diffusers takes that mesh instead of building one over the whole world.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from batch_runner.errors import UserError

log = logging.getLogger(__name__)

ATTENTIONS = ("ulysses", "ring")  # in this order: ATTENTIONS[ring]


def replica_ranks(world_size: int, gpus: int) -> list[list[int]]:
    """The global ranks of each replica: consecutive runs of `gpus` ranks, so a replica stays on one
    host whenever `gpus` divides the processes per host (accelerate numbers ranks host by host)."""
    if gpus < 1 or world_size % gpus:
        raise ValueError(f"{gpus} GPUs per replica do not divide {world_size} processes")
    return [list(range(start, start + gpus)) for start in range(0, world_size, gpus)]


@dataclass
class Team:
    """This process's replica: which one it is, its ranks, and what they communicate over."""

    index: int  # the replica's number, 0 ... count - 1
    count: int  # replicas in the run
    ranks: list[int]  # the replica's global ranks, leader first
    rank: int  # this process's global rank
    group: Any = None  # the replica's process group (None for a replica of one process)
    mesh: Any = None  # the replica's DeviceMesh, dims ("ring", "ulysses")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def leads(self) -> bool:
        """Whether this process claims rows and writes videos for its replica."""
        return self.rank == self.ranks[0]

    def share(self, chunks: Iterable[range] | None) -> Iterator[range]:
        """The leader's chunks of rows, on every process of the replica.

        The leader iterates `chunks` (its claims) and broadcasts each one before making it, then
        None to say it is done; the others (`chunks` is None there) receive until then.
        """
        if self.size == 1:
            yield from chunks or ()
            return
        if self.leads:
            for chunk in chunks or ():
                self._broadcast((chunk.start, chunk.stop))
                yield chunk
            self._broadcast(None)
            return
        while (bounds := self._broadcast(None)) is not None:
            yield range(*bounds)

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=self.ranks[0], group=self.group)
        return box[0]


def form_team(rank: int, world_size: int, gpus: int, device_type: str, ring: bool = False) -> Team:
    """This process's replica, creating every replica's group and the run's mesh (all ranks call it)."""
    groups = replica_ranks(world_size, gpus)
    index = rank // gpus
    if gpus == 1:
        return Team(index=index, count=len(groups), ranks=groups[index], rank=rank)
    from torch.distributed.device_mesh import init_device_mesh

    mine = None
    for ranks in groups:  # the same new_group calls, in the same order, on every rank
        group = torch.distributed.new_group(ranks)
        if rank in ranks:
            mine = group
    ring_degree, ulysses_degree = (gpus, 1) if ring else (1, gpus)
    mesh = init_device_mesh(
        device_type, (len(groups), ring_degree, ulysses_degree), mesh_dim_names=("replica", "ring", "ulysses")
    )
    team = Team(
        index=index, count=len(groups), ranks=groups[index], rank=rank, group=mine, mesh=mesh["ring", "ulysses"]
    )
    log.info(
        "replica %d of %d: ranks %s, %s attention", index, len(groups), groups[index], "ring" if ring else "ulysses"
    )
    return team


def split_attention(denoiser: torch.nn.Module, team: Team, attention: str) -> None:
    """Split the denoiser's sequence across the replica with diffusers' context parallelism."""
    from diffusers import ContextParallelConfig

    heads = denoiser.config.get("num_attention_heads")
    if attention == "ulysses" and heads and heads % team.size:
        raise UserError(
            f"replica.gpus={team.size} does not divide {type(denoiser).__name__}'s {heads} attention heads, "
            f"which Ulysses attention splits; use a replica.gpus that divides {heads}, or replica.attention=ring."
        )
    degrees = {"ring_degree": team.size} if attention == "ring" else {"ulysses_degree": team.size}
    config = ContextParallelConfig(**degrees, mesh=team.mesh)
    # diffusers 0.42 gathers with a torch function that warns on every call; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor` is deprecated", category=FutureWarning)
    with _one_device_on_cpu(team.mesh.device_type):
        denoiser.enable_parallelism(config=config)


@contextlib.contextmanager
def _one_device_on_cpu(device_type: str) -> Iterator[None]:
    """diffusers (0.42) picks its device as `rank % torch.accelerator.device_count()`, a division by
    zero without an accelerator; on the CPU it only records that device, so count one."""
    if device_type != "cpu":
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield
