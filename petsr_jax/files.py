"""All-or-nothing files: every result is written to a temporary sibling, then renamed.

An interruption (Ctrl-C, a killed job, a full disk) never leaves a half-written result, and a
reader never sees one: the rename is atomic on POSIX file systems. Temporary names start with a
dot and end in `.tmp`, so listings and readers skip them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, payload: bytes) -> Path:
    """Write `payload` to `path` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from collaborators
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj) -> Path:
    return write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_figure_atomic(fig, path: Path, **kwargs) -> Path:
    """`fig.savefig` through a temporary file and a rename."""
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return write_atomic(path, buf.getvalue())
