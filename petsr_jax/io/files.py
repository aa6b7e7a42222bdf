"""Where outputs land: a writer never replaces or writes into the scan it read.

Writers write under a temporary name beside the target and rename at the end, so a reader never
sees half a result.
"""

from __future__ import annotations

from pathlib import Path

from petsr_jax.io.errors import ScanError
from petsr_jax.volume import Volume


def refuse_source(target: Path, volume: Volume) -> None:
    """Refuse a target equal to, or inside, the file or folder the volume was read from."""
    source = volume.meta.get("source_path")
    if source is None:
        return
    source = Path(source).resolve()
    target = target.resolve()
    if target == source or (source.is_dir() and source in target.parents):
        raise ScanError(f"{target}: refusing to write into the input {source}")
