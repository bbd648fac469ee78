"""Run the Hydra jobs the way users do: composed from conf/ with command-line overrides."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def compose(config_name: str, overrides: list[str]):
    """The job's config exactly as `python jobs/<job>.py overrides...` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def import_job(name: str):
    """Import jobs/<name>.py as a module (jobs/ is a folder of scripts, not a package)."""
    if str(JOBS) not in sys.path:
        sys.path.insert(0, str(JOBS))
    return importlib.import_module(name)


def run_job(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a job as a subprocess from the repository root, as in the README."""
    return subprocess.run(
        [sys.executable, str(JOBS / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def prepare_training_data(root: Path, images: int = 4, *image_overrides: str) -> dict[str, Path]:
    """The tiny training set of the Ray tests: 6 procedural objects x 8 views at 16 px
    (``root/mv``) and ``images`` builtin text-image rows (``root/2d``), by jobs/prepare_data.py."""
    prepare = import_job("prepare_data")
    prepare.run(compose("prepare_data", ["source=shapes", "num_objects=6", "views=8", "resolution=16",
                                         "backend=serial", f"out={root / 'mv'}"]))
    prepare.run(compose("prepare_data", ["source=images", "input=builtin", f"num_objects={images}",
                                         "resolution=16", *image_overrides, f"out={root / '2d'}"]))
    return {"mv": root / "mv", "2d": root / "2d"}
