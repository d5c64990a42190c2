"""The castlens command with a fault planted on rank 1, for tests/test_distributed.py (launched by torchrun).

``CASTLENS_TEST_FAULT=kill``: rank 1 SIGKILLs itself right after writing its first part (a node lost mid-run);
``raise``: rank 1 raises instead of writing its first part (a bug in one unit).
"""

import os
import signal
import sys
from pathlib import Path

import castlens.experiments.run as run_module
from castlens.cli import main

_write = run_module.write_json


def write_json(path, obj):
    if os.environ.get("RANK") == "1" and Path(path).name.endswith(".part.json"):
        if os.environ["CASTLENS_TEST_FAULT"] == "raise":
            raise RuntimeError(f"planted failure on rank 1 before writing {Path(path).name}")
        _write(path, obj)
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(path, obj)


run_module.write_json = write_json  # type: ignore[assignment]
sys.exit(main(sys.argv[1:]))
