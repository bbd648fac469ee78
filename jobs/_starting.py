"""Imported first by every job script: one line on the terminal before the heavy imports.

torch, diffusers, transformers and ray take a few seconds to import on an idle laptop and, as
measured on a busy 2-core machine, 40-110 s; a job that prints nothing all that time looks hung.
The line goes to stderr (stdout stays the job's own) and only when the job runs as a script:
tests, Ray workers and Tune trials that import a job module print nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

JOBS = Path(__file__).resolve().parent


def announce() -> str | None:
    """Print (and return) the start line when ``__main__`` is one of the job scripts."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file or Path(main_file).resolve().parent != JOBS:
        return None
    line = (f"{Path(main_file).stem}: started {time.strftime('%H:%M:%S')}, loading torch and "
            "diffusers (seconds; a minute or more on a busy machine)")
    print(line, file=sys.stderr, flush=True)
    return line


announce()
