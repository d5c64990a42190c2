"""Run: one experiment's folder, the same for every experiment and the CLI.

A run folder holds ``config.json`` (everything that determines the numbers), one ``parts/<unit>.part.json`` per
finished unit of work (a target task, say), and the tables and figures made from the parts::

    run = Run(out, config)            # opens the folder: removes temp files a killed run left, writes the config
                                      # or refuses a different one
    parts = run.parts(units, compute, load)   # finished parts are read back, never rewritten; the rest computed
    if run.world.main:                # in a multi-process launch, one rank writes the tables
        run.write("results.md", text) # atomic, like every file castlens writes (castlens.files)
    run.figure("accuracy", fig)       # HTML, and PNG where export works here (decided once per run)

A config is a frozen dataclass with ``to_dict``. A config key that a newer castlens added counts, for a run
written before it existed, with the field's default; any other difference is refused, naming the keys, so a
resumed run can never mix parts computed under two configs. ``inputs`` (name -> sha256 of a task file or a
model's weights) are part of the config: a part is not reused after its inputs changed.

Under ``torchrun`` (:mod:`castlens.distributed`) the same code is data parallel: rank 0 opens the folder, every
rank computes its share of the unfinished units and writes their parts, and after a barrier every rank has all
parts; the runners then let rank 0 alone write the tables, which are therefore those of a single process.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence, TypeVar

from castlens.distributed import World
from castlens.distributed import world as _world
from castlens.files import as_json, atomic_write, remove_stale_temp, write_json

__all__ = ["Run", "RunConfig", "RunError"]

T = TypeVar("T")


class RunError(ValueError):
    """A run folder that cannot be used for this run (another config, changed inputs)."""


class RunConfig(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def _defaults(config: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(config):
        return {}
    return as_json({f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING})


class Run:
    """A run folder (see the module docstring). ``png=None``: PNGs where export works here, else HTML only
    (said once); ``inputs``: checksums of what the run reads, checked on resume; ``world``: the launch (default:
    :func:`castlens.distributed.world`)."""

    def __init__(self, out: str | Path, config: RunConfig, png: bool | None = None,
                 inputs: Mapping[str, str] | None = None, log: Callable[[str], None] = print,
                 world: World | None = None):
        self.out, self.config, self.log = Path(out), config, log
        self.world, self._inputs = world or _world(), inputs
        if self.world.main:  # before any rank writes: a temp file now is a killed writer's
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp(self.out)
            self._open()
        self.world.barrier()
        if not self.world.main:
            self._open()
        self._png = png

    def _open(self) -> None:
        config, inputs = self.config, self._inputs
        now = as_json(config.to_dict())
        if inputs:
            now["inputs"] = dict(sorted(inputs.items()))
        path = self.out / "config.json"
        if path.exists():
            old = {**_defaults(config), **json.loads(path.read_text())}
            if "inputs" not in old or inputs is None:  # a run from before inputs were recorded, or a report
                old.pop("inputs", None)                  # that reads none: the parts are trusted as they are
                now.pop("inputs", None)
            if old != now:
                diff = {k: (old.get(k), now.get(k)) for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)}
                what = "its inputs changed (a task file or the model's weights)" if set(diff) == {"inputs"} else \
                    "it has a different config"
                raise RunError(f"{self.out} holds a run that cannot be resumed here: {what} {diff}; use another "
                               "--out (or delete the folder)")
        else:
            write_json(path, now)

    @property
    def png(self) -> bool:
        if self._png is None:
            from castlens import plots

            self._png = plots.png_export_available()
            if not self._png:
                self.log(f"note: writing HTML figures only; for PNGs: {plots.PNG_EXPORT_FIX}")
        return self._png

    def part_path(self, unit: str) -> Path:
        return self.out / "parts" / f"{unit}.part.json"

    def unfinished(self, units: Sequence[str]) -> list[str]:
        """The units of ``units`` that have no part yet."""
        return [u for u in units if not self.part_path(u).exists()]

    def parts(self, units: Sequence[str], compute: Callable[[str, list[T]], T], load: Callable[[dict], T],
              dump: Callable[[T], dict], sizes: Mapping[str, float] | None = None,
              after: Collection[str] = ()) -> dict[str, T]:
        """Each unit's finished part if there is one (read with ``load``, never rewritten), else ``compute(unit,
        earlier)``, written atomically (``dump``) as soon as it is done; returns every unit's part, in order.

        ``after``: units that read the others' results (a target without a train split borrows their settings):
        they start once every other unit is finished and get those parts, in ``units`` order, as ``earlier``;
        every other unit gets ``[]``. In a multi-process launch each rank computes its share of the unfinished
        units (balanced by ``sizes``: test items, logged as such when whole numbers, or any cost estimate) and,
        after a barrier, reads the rest from the other ranks' parts."""
        first = [u for u in units if u not in after]
        done = self._wave(first, lambda u: compute(u, []), load, dump, sizes, units)
        earlier = [done[u] for u in first]
        done.update(self._wave([u for u in units if u in after], lambda u: compute(u, earlier), load, dump, sizes,
                               units))
        return {u: done[u] for u in units}

    def _wave(self, units: Sequence[str], compute: Callable[[str], T], load: Callable[[dict], T],
              dump: Callable[[T], dict], sizes: Mapping[str, float] | None, everything: Sequence[str]) -> dict[str, T]:
        todo = self.unfinished(units)
        self.world.barrier()  # every rank has listed the unfinished units before any rank writes one
        mine = self.world.mine(todo, sizes)
        done: dict[str, T] = {}
        for unit in units:
            i = everything.index(unit) + 1
            if unit not in todo:
                done[unit] = load(json.loads(self.part_path(unit).read_text()))
                self.log(f"[{i}/{len(everything)}] {unit}: finished earlier, kept")
            elif unit in mine:
                t0 = time.perf_counter()
                n = (sizes or {}).get(unit)
                self.log(f"[{i}/{len(everything)}] {unit}" + (f": {n} test items" if isinstance(n, int) else ""))
                done[unit] = compute(unit)
                write_json(self.part_path(unit), dump(done[unit]))
                self.log(f"  done in {time.perf_counter() - t0:.0f}s")
        self.world.barrier()  # every part of this wave is on disk
        for unit in todo:
            if unit not in mine:
                done[unit] = load(json.loads(self.part_path(unit).read_text()))
        return done

    def write(self, name: str, text: str) -> Path:
        return atomic_write(self.out / name, text)

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.out / name, obj)

    def figure(self, stem: str, fig: Any) -> list[Path]:
        from castlens import plots

        return plots.save_figure(fig, self.out / stem, png=self.png)
