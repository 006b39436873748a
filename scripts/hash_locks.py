"""Write the sha256 of every locked file into requirements.lock and requirements-dev.lock.

With hashes, `pip install -r` runs in hash-checking mode: it installs only the very files that were locked, so a
re-uploaded or tampered release fails the install instead of landing in an image. The hashes are of the files pip
picks where the project is installed (CI and the Dockerfile: Linux x86_64, CPython 3.11; torch is the CPU wheel
the machine holds on local disk). Run after changing a pin:

    python scripts/hash_locks.py
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = [ROOT / "requirements.lock", ROOT / "requirements-dev.lock"]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\]+)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in lock.read_text().splitlines() if (m := PIN.match(line))]


def downloaded_hashes(requirements: list[str]) -> dict[str, str]:
    """sha256 of the file pip picks for each requirement here, by normalised project name."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, *requirements],
            check=True,
        )
        hashes = {}
        for path in Path(tmp).iterdir():
            name = path.name.split("-")[0] if path.suffix == ".whl" else path.name.rsplit("-", 1)[0]
            hashes[normalise(name)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return hashes


def rewrite(lock: Path, hashes: dict[str, str]) -> str:
    """The lock with each pin followed by its hash; comments kept, earlier hashes replaced."""
    lines = []
    for line in lock.read_text().splitlines():
        if line.strip().startswith("--hash="):
            continue
        match = PIN.match(line)
        if match is None:
            lines.append(line)
            continue
        lines.append(f"{match[1]}=={match[2]} \\")
        lines.append(f"    --hash=sha256:{hashes[normalise(match[1])]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    hashes = downloaded_hashes([f"{name}=={version}" for lock in LOCKS for name, version in pins(lock)])
    for lock in LOCKS:
        text = rewrite(lock, hashes)
        temporary = lock.with_suffix(".lock.tmp")
        temporary.write_text(text)
        temporary.replace(lock)  # never a half-written lock
        print(f"{lock.name}: {len(pins(lock))} pins hashed")


if __name__ == "__main__":
    main()
