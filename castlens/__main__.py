"""``python -m castlens`` and ``torchrun --nproc-per-node N -m castlens ...``: the ``castlens`` command.

Under torchrun a rank's uncaught exception is recorded (torch's ``@record``) so the launch reports that rank's
error and traceback.
"""

import os
import sys

from castlens.cli import main

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
sys.exit(main())
