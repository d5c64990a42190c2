"""Run: one experiment's folder, the same for every experiment and the CLI.

A run folder holds ``config.json`` (everything that determines the numbers), one ``parts/<unit>.part.json`` per
finished unit of work (a target task, say), and the tables and figures made from the parts::

    run = Run(out, config)            # opens the folder: removes temp files a killed run left, writes the config
                                      # or refuses a different one
    parts = run.parts(units, compute, load)   # finished parts are read back, never rewritten; the rest computed
    run.write("results.md", text)     # atomic, like every file castlens writes (castlens.files)
    run.figure("accuracy", fig)       # HTML, and PNG where export works here (decided once per run)

A config is a frozen dataclass with ``to_dict``. A config key that a newer castlens added counts, for a run
written before it existed, with the field's default; any other difference is refused, naming the keys, so a
resumed run can never mix parts computed under two configs. ``inputs`` (name -> sha256 of a task file or a
model's weights) are part of the config: a part is not reused after its inputs changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

from castlens.files import atomic_write, remove_stale_temp, write_json

__all__ = ["Run", "RunConfig", "RunError"]

T = TypeVar("T")


class RunError(ValueError):
    """A run folder that cannot be used for this run (another config, changed inputs)."""


class RunConfig(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def _plain(obj: Any) -> Any:
    """JSON-normalised (tuples become lists), so a config compares equal to its own file."""
    return json.loads(json.dumps(obj))


def _defaults(config: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(config):
        return {}
    return _plain({f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING})


class Run:
    """A run folder (see the module docstring). ``png=None``: PNGs where export works here, else HTML only
    (said once); ``inputs``: checksums of what the run reads, checked on resume."""

    def __init__(self, out: str | Path, config: RunConfig, png: bool | None = None,
                 inputs: Mapping[str, str] | None = None, log: Callable[[str], None] = print):
        self.out, self.config, self.log = Path(out), config, log
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(self.out)
        now = _plain(config.to_dict())
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
        self._png = png

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

    def parts(self, units: Sequence[str], compute: Callable[[str, list[T]], T], load: Callable[[dict], T],
              dump: Callable[[T], dict], sizes: Mapping[str, int] | None = None) -> dict[str, T]:
        """Each unit's finished part if there is one (read with ``load``, never rewritten), else ``compute(unit,
        parts finished so far)``, written atomically (``dump``) before the next unit starts."""
        done: dict[str, T] = {}
        for i, unit in enumerate(units, 1):
            path = self.part_path(unit)
            if path.exists():
                done[unit] = load(json.loads(path.read_text()))
                self.log(f"[{i}/{len(units)}] {unit}: finished earlier, kept")
                continue
            t0 = time.perf_counter()
            self.log(f"[{i}/{len(units)}] {unit}" + (f": {sizes[unit]} test items" if sizes else ""))
            done[unit] = compute(unit, list(done.values()))
            write_json(path, dump(done[unit]))
            self.log(f"  done in {time.perf_counter() - t0:.0f}s")
        return done

    def write(self, name: str, text: str) -> Path:
        return atomic_write(self.out / name, text)

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.out / name, obj)

    def figure(self, stem: str, fig: Any) -> list[Path]:
        from castlens import plots

        return plots.save_figure(fig, self.out / stem, png=self.png)
