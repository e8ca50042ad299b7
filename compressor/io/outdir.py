"""Writing an export's output directory safely: refuse what is not ours, replace atomically.

An export is built in a staging directory beside OUTDIR and renamed into place.
Replacing an earlier export (``--force``) renames the old one aside first, then
the new one in, then deletes the old one, so a kill at any moment leaves OUTDIR
either the old export, the new one, or (between the two renames) absent with the
old one kept aside; the next export into the same place puts it back or clears it.
A directory is replaced only when it holds an export's own marker file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from compressor.errors import CompressorError

MARKER = "compressor.json"  # written into every directory export; not a config transformers reads
MARKER_FORMAT = "compressor-export"


def marker(content: str, artifact: str, label: str, base: str | None) -> dict:
    """What a directory export says about itself in its marker file."""
    return {
        "format": MARKER_FORMAT,
        "content": content,
        "artifact": artifact,
        "ref": label,
        "base": base,
    }


def read_marker(directory: Path) -> dict | None:
    """The marker of an export directory, or None when it is not one."""
    path = Path(directory) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def check_replaceable(out: Path, protected: list[Path]) -> None:
    """Refuse to replace ``out`` unless it is a file or an earlier export directory.

    ``protected`` are directories that must never be deleted (the store); their
    parents, the current and the home directory are refused too.
    """
    target = out.resolve()
    guarded = {Path.cwd().resolve(), Path.home().resolve(), Path(target.anchor)}
    for p in protected:
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise CompressorError(f"refusing to replace {out}: it holds the artifact store at {p}")
    if target in guarded:
        raise CompressorError(
            f"refusing to replace {out}: it is the current, the home or the root directory"
        )
    if not out.is_dir() or out.is_symlink():
        return
    if read_marker(out) is None:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise CompressorError(
            f"refusing to replace {out}: it is not an earlier export (no {MARKER}; it holds "
            f"{shown}); remove it yourself or choose another directory"
        )


def staging_dir(out: Path) -> Path:
    """A fresh staging path beside ``out`` (same filesystem, so renames are atomic)."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(staged: Path, out: Path) -> None:
    """Move a finished staging directory (or file) to ``out``, replacing what is there."""
    if not out.exists() and not out.is_symlink():
        os.replace(staged, out)
        return
    if out.is_file() or out.is_symlink():
        os.replace(staged, out)
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, aside)
    os.replace(staged, out)
    shutil.rmtree(aside, ignore_errors=True)


_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def clean_stale(out: Path) -> None:
    """Remove the staging that killed exports left in ``out``'s folder (for any output
    there, not only ``out``); restore an old export one set aside before it died."""
    parent = out.parent
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        m = _STAGED.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not (target.exists() or target.is_symlink()):
            os.replace(p, target)  # killed between the two renames: the old export comes back
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
