"""Preflight: what a stage will need, worked out from shapes and settings before any weight is read.

Every stage of the pipeline (analyze, plan, prune, recover, evaluate, bench, export, report) has a
preflight function beside the function that runs it. It validates the stage's settings, reads the
data it will need (enough tokens for the rows asked), and returns a `Preflight`: what the stage
will do, a rough time, the memory it needs on its device and the bytes it writes. `check` then
holds the estimates against a `Machine`: this one by default, or the hardware a recipe names, so
that the tests can preflight the Llama-3-8B recipes against one H200 on a CPU-only machine.

`prunekit run` preflights every stage of a recipe before the first one runs; the single-stage
commands (`prunekit prune`, `recover`, ...) preflight their one stage; `--dry-run` prints them.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models import memory
from prunekit.models.memory import InsufficientMemoryError, MemoryEstimate

GIB = 2**30


class InsufficientDiskError(PrunekitError, OSError):
    """What a run will write clearly exceeds the free space of its disk."""


@dataclass(frozen=True)
class Machine:
    """Free memory per device and free disk, in bytes; None where unknown (then nothing is refused).

    `Machine.here()` is this machine: its free memory is read when a stage is checked. A described
    machine (`Machine.described(cpu_gib=..., gpu_gib=(...))`) stands for the hardware a recipe is
    written for."""

    cpu: int | None = None
    gpus: tuple[int, ...] = ()
    disk: int | None = None
    live: bool = False                 # read this machine's free memory at each check

    @classmethod
    def here(cls, path: Path | None = None) -> Machine:
        return cls(disk=free_disk(path or Path.cwd()), live=True)

    @classmethod
    def described(cls, *, cpu_gib: float, gpu_gib: tuple[float, ...] = (), disk_gib: float | None = None) -> Machine:
        return cls(cpu=int(cpu_gib * GIB), gpus=tuple(int(g * GIB) for g in gpu_gib),
                   disk=None if disk_gib is None else int(disk_gib * GIB))

    @property
    def has_gpu(self) -> bool:
        if self.live:
            import torch

            return torch.cuda.is_available()
        return bool(self.gpus)

    def free(self, device: str) -> int | None:
        if self.live:
            return memory.available_bytes(device)
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or os.environ.get("LOCAL_RANK", "0"))
            return self.gpus[index] if index < len(self.gpus) else 0
        return self.cpu


def free_disk(path: Path) -> int | None:
    """Free bytes on the disk that `path` (or its nearest existing parent) lies on."""
    path = Path(path).resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


@dataclass(frozen=True)
class Need:
    """Memory one stage needs on one device, and what to change when it does not fit."""

    device: str
    estimate: MemoryEstimate
    hints: str
    what: str = ""       # e.g. "the model in CPU memory" when a stage needs two devices


@dataclass(frozen=True)
class Preflight:
    stage: str
    what: str                                 # one line: what the stage will do
    seconds: float                            # a rough time, from the rates of its device
    needs: tuple[Need, ...] = ()
    disk_bytes: int = 0                       # what it writes
    notes: tuple[str, ...] = field(default_factory=tuple)
    leaves: Any = None                        # the ModelStructure this stage leaves, for the stages after it

    @property
    def device(self) -> str:
        return self.needs[0].device if self.needs else "cpu"

    def check(self, machine: Machine, subject: str) -> None:
        """Refuse the stage when an estimate exceeds what `machine` has free on that device."""
        for need in self.needs:
            free = machine.free(need.device)
            if free is not None and need.estimate.total > free:
                where = f"the {need.device}" + (f" ({need.what})" if need.what else "")
                raise InsufficientMemoryError(
                    f"{self.stage} of {subject} needs at least {_gib(need.estimate.total)} "
                    f"({need.estimate.describe()}) on {where}, which has {_gib(free)} free; {need.hints}")


def check_disk(preflights: list[Preflight], machine: Machine, where: Path) -> None:
    """Refuse a run whose outputs together clearly exceed the free space of their disk."""
    needed = sum(p.disk_bytes for p in preflights)
    if machine.disk is not None and needed > machine.disk:
        parts = ", ".join(f"{p.stage} {_gib(p.disk_bytes)}" for p in preflights if p.disk_bytes)
        raise InsufficientDiskError(
            f"the run writes about {_gib(needed)} ({parts}) under {where}, but its disk has {_gib(machine.disk)} free; "
            "free some space, write to another disk, or save in bfloat16")


def check_all(preflights: list[Preflight], machine: Machine, subject: str, where: Path) -> None:
    for preflight in preflights:
        preflight.check(machine, subject)
    check_disk(preflights, machine, where)


def human_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_preflights(preflights: list[Preflight]) -> str:
    """One row per stage: what it does, where, the memory it needs there, what it writes, a rough time."""
    rows = [(p.stage, p.what, p.device,
             " + ".join(_gib(n.estimate.total) + (f" {n.device}" if i else "") for i, n in enumerate(p.needs)) or "-",
             _gib(p.disk_bytes) if p.disk_bytes else "-", f"~{human_seconds(p.seconds)}") for p in preflights]
    header = ("stage", "what", "device", "memory", "writes", "rough time")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    total = sum(p.seconds for p in preflights)
    lines.append(f"{'total':{widths[0]}s}  {'':{sum(widths[1:5]) + 8}s}~{human_seconds(total)}")
    notes = [f"{p.stage}: {note}" for p in preflights for note in p.notes]
    return "\n".join(lines + notes)


def _gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


__all__ = ["InsufficientDiskError", "Machine", "Need", "Preflight", "check_all", "check_disk", "format_preflights",
           "free_disk", "human_seconds"]
