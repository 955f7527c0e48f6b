"""Real full or read-only file systems for tests: a small tmpfs in a private mount namespace."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def can_mount_tmpfs(tmp: Path) -> bool:
    """Whether this machine lets an unprivileged user mount a tmpfs (needs unshare and user namespaces)."""
    probe = tmp / "probe"
    probe.mkdir()
    cmd = f"mount -t tmpfs -o size=64k tmpfs {probe} && touch {probe}/x"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd], capture_output=True).returncode == 0
