"""The wheels a bare GPU machine needs for `scripts/gpu-check.sh`, in parts that each travel in one
device call (a call carries at most 64 MiB, the project tree included).

    python scripts/gpu_wheels.py download --python 3.12 --dest .gpu/wheels --part-mb 58
    python scripts/gpu_wheels.py install .gpu/wheels/part-1 --target .gpu/site   # there

The bare machine brings Python, a CUDA build of torch, transformers and peft; everything else this
project imports (Flower without Ray, datasets and pyarrow, Hydra, bitsandbytes, Opacus, pytest) is
the dependency closure of our pins in this environment minus what torch, transformers and peft
already pull in. `install` skips a distribution the machine already has (its own numpy, its own
torch), so a wheel never shadows a package the CUDA build was compiled against.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: What the GPU machine brings, with everything these pull in.
PROVIDED = ("torch", "transformers", "peft")
#: What the check imports beyond them (our pins in pyproject.toml; Flower without its Ray extra).
NEEDED = (
    "flwr", "flwr-datasets", "datasets", "pyarrow", "hydra-core", "omegaconf", "psutil", "bitsandbytes",
    "opacus", "galore-torch", "opt-einsum", "scipy", "pytest", "safetensors",
)  # fmt: skip
#: Never carried: the machine's own CUDA stack, Ray (too large for a call), uv (Flower builds apps
#: with it; the check builds none).
NEVER = re.compile(r"^(torch|triton|nvidia-.*|ray|cuda-.*|uv)$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name: str) -> list[str]:
    """``name``'s unconditional requirements (no extras) in this environment."""
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for requirement in requires:
        if "extra ==" in requirement:
            continue
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)", requirement)
        if match:
            names.append(canonical(match.group(1)))
    return names


def closure(roots: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(requirements(name))
    return seen


def download(python: str, dest: Path, part_mb: float) -> None:
    wanted = sorted(closure(NEEDED) - closure(PROVIDED) - {n for n in closure(NEEDED) if NEVER.match(n)})
    pins = [f"{name}=={metadata.version(name)}" for name in wanted if _installed(name)]
    with tempfile.TemporaryDirectory() as folder:
        common = ["--quiet", "--no-deps", "--dest", folder]
        for pin in pins:
            targets = [a for p in PLATFORMS for a in ("--platform", p)]
            binary = [sys.executable, "-m", "pip", "download", *common, "--only-binary=:all:",
                      "--python-version", python, *targets, pin]  # fmt: skip
            if subprocess.run(binary, check=False).returncode != 0:  # a source-only release
                build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", folder, pin]
                subprocess.run(build, check=True)
        wheels = sorted(Path(folder).glob("*.whl"), key=lambda p: -p.stat().st_size)
        parts: list[list[Path]] = []
        for wheel in wheels:  # first fit, largest first
            size = wheel.stat().st_size / 2**20
            if size > part_mb:
                raise SystemExit(f"{wheel.name} ({size:.0f} MiB) exceeds a part of {part_mb} MiB")
            part = next((p for p in parts if _mb(p) + size <= part_mb), None)
            if part is None:
                parts.append(part := [])
            part.append(wheel)
        shutil.rmtree(dest, ignore_errors=True)
        for index, wheels_k in enumerate(parts, start=1):
            folder_k = dest / f"part-{index}"
            folder_k.mkdir(parents=True)
            for wheel in wheels_k:
                shutil.copy2(wheel, folder_k / wheel.name)
            print(f"{folder_k}: {len(wheels_k)} wheels, {_mb(wheels_k):.1f} MiB")


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(f"not installed here, left out: {name}", file=sys.stderr)
        return False
    return True


def _mb(wheels: list[Path]) -> float:
    return sum(w.stat().st_size for w in wheels) / 2**20


def install(part: Path, target: Path) -> None:
    """Install the part's wheels that this machine lacks into ``target`` (on ``PYTHONPATH``)."""
    have = {canonical(d.metadata["Name"]) for d in metadata.distributions()}
    missing = [w for w in sorted(part.glob("*.whl")) if canonical(w.name.split("-")[0]) not in have]
    for wheel in sorted(set(part.glob("*.whl")) - set(missing)):
        print(f"the machine has it: {wheel.name}")
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                   "--ignore-requires-python", "--target", str(target), *map(str, missing)]  # fmt: skip
        subprocess.run(command, check=True)
    print(f"installed {len(missing)} wheels of {part} into {target}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="action", required=True)
    get = sub.add_parser("download")
    get.add_argument("--python", default="3.12")
    get.add_argument("--dest", type=Path, default=Path(".gpu/wheels"))
    get.add_argument("--part-mb", type=float, default=58.0)
    put = sub.add_parser("install")
    put.add_argument("part", type=Path)
    put.add_argument("--target", type=Path, default=Path(".gpu/site"))
    args = parser.parse_args()
    if args.action == "download":
        download(args.python, args.dest, args.part_mb)
    else:
        install(args.part, args.target)


if __name__ == "__main__":
    main()
