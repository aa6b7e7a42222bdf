"""Process set-up for fast CPU runs: the XLA:CPU flag and the allocator, before JAX starts.

`configure(relaunch=True)` is the first line of every launch script. Both settings are
process-wide and only for CPU runs (nothing happens when an accelerator will be used):

* XLA flags. jaxlib 0.10's default XLA:CPU pipeline hands convolutions to its YNNPACK fusions,
  whose weight-gradient convolution is several times slower than Eigen's; turning them off
  roughly doubles the DeepSR train step when XLA computes the convolutions (4.4 → 7.1 img/s,
  measured with `launch/benchmark.py --conv=cpu`). XLA reads its flags
  once, when the backend starts, hence a function to call first thing.
* The allocator (`use_tcmalloc`): XLA:CPU allocates each step's temporaries — about 0.6 GB
  for DeepSR at 16×48×48 — as one block that glibc maps afresh and page-faults in every step.
  Where tcmalloc is installed the script re-executes itself with it preloaded, which keeps the
  block for reuse: the DeepSR train step ran 6–16 % faster (README, "Speed").
  `PETSR_ALLOCATOR=system` keeps glibc.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"

# XLA:CPU flags per jaxlib (major, minor) they were measured on. A flag an XLA build does not
# know aborts the process at start-up, so nothing is set for versions not measured here; after an
# upgrade, measure with `launch/benchmark.py` and add the version.
CPU_XLA_FLAGS: dict[tuple[int, int], str] = {
    # Empty value: no YNNPACK fusions at all, convolutions (and their gradients) go to Eigen.
    (0, 10): f"{YNN_FUSION_FLAG}=",
}

# Accelerator plugins whose presence means computations will not run on XLA:CPU.
_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin", "libtpu")


def _jaxlib_version() -> tuple[int, int] | None:
    from importlib import metadata

    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _accelerator_expected(environ) -> bool:
    """True when JAX will pick a GPU/TPU: an explicit platform list, else an installed plugin."""
    platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", ""))
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    from importlib import metadata

    for name in _ACCELERATOR_PLUGINS:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


ALLOCATOR_ENV = "PETSR_ALLOCATOR"
# gperftools' tcmalloc, as Debian/Ubuntu (`libtcmalloc-minimal4`), Fedora and conda ship it.
TCMALLOC_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def find_tcmalloc(search_dirs: Iterable[str] | None = None) -> str | None:
    """Path of an installed tcmalloc shared library, or None.

    Looks in this Python's prefix (conda environments), `$CONDA_PREFIX` and the system library
    directories, in that order.
    """
    import sysconfig

    if search_dirs is None:
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        search_dirs = [
            os.path.join(sys.prefix, "lib"),
            os.path.join(os.environ.get("CONDA_PREFIX", sys.prefix), "lib"),
            *(os.path.join(root, multiarch) for root in ("/usr/lib", "/lib") if multiarch),
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        ]
    for directory in search_dirs:
        for name in TCMALLOC_LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (it is mapped into the process)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtcmalloc" in line for line in maps)
    except OSError:
        return False


def _allocator_choice(environ) -> str:
    choice = environ.get(ALLOCATOR_ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if choice not in ("tcmalloc", "system"):
        raise ValueError(f"{ALLOCATOR_ENV} must be 'tcmalloc' or 'system', not {choice!r}")
    return choice


def _can_reexecute() -> bool:
    """A script or `-m`/`-c` run can be re-executed with its argv; a REPL or notebook cannot."""
    import multiprocessing

    argv = getattr(sys, "orig_argv", None)
    if not argv or len(argv) < 2 or hasattr(sys, "ps1") or sys.flags.interactive:
        return False
    if multiprocessing.parent_process() is not None:  # a worker: its parent decided
        return False
    return "ipykernel" not in sys.modules and sys.argv[0] not in ("", "-")


def use_tcmalloc(execve: Callable = os.execve) -> bool:
    """Run this process on tcmalloc: re-execute it once with tcmalloc in `LD_PRELOAD`.

    Why: XLA:CPU allocates each step's temporaries — about 0.6 GB for DeepSR at 16×48×48 — as
    one block from a worker thread. glibc serves a block that large from a fresh `mmap` every
    step and unmaps it at the end, so every step first-touches 0.6 GB again (~143,000 page
    faults, ~10 % of the step). tcmalloc keeps freed blocks for reuse, as PyTorch's CPU
    allocator effectively does for its tensors. (glibc cannot be told to: its `mmap` threshold is
    capped at 32 MiB, and keeping large blocks in its main arena fragmented the heap in about
    one fresh process in five, to 4 GB.) The preload has to be in place before the process
    starts, hence the re-execution: same interpreter, same arguments, same PID.

    Returns True when the process already runs on tcmalloc, False when it stays on the system
    allocator: `PETSR_ALLOCATOR=system`, no tcmalloc installed (`apt-get install
    libtcmalloc-minimal4`), an accelerator run, a notebook or REPL, or a preload that did not
    take. Does not return when it re-executes. Call it first thing in a script, before threads.
    """
    if tcmalloc_loaded():
        return True
    if _allocator_choice(os.environ) == "system" or sys.platform != "linux":
        return False
    if _accelerator_expected(os.environ) or not _can_reexecute():
        return False
    library = find_tcmalloc()
    if library is None:
        log.info(
            "tcmalloc not found: CPU training runs ~10%% slower on glibc's allocator "
            "(apt-get install libtcmalloc-minimal4; %s=system silences this)",
            ALLOCATOR_ENV,
        )
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if library in preload.replace(":", " ").split():
        log.warning("%s is in LD_PRELOAD but not loaded; staying on the system allocator", library)
        return False
    env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip())
    # tcmalloc reports every allocation over 1 GiB on stderr; XLA's temporaries for large
    # batches are that big by design.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 42))
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return False  # only reached when `execve` is replaced (tests)


def configure(environ=None, *, relaunch: bool = False) -> str | None:
    """Add the measured XLA:CPU flags to `XLA_FLAGS`; call before JAX's first computation.

    With `relaunch=True` (the launch scripts) it first moves the process onto tcmalloc by
    re-executing it (`use_tcmalloc`), so call it first thing. Does nothing (returns None) when an
    accelerator will be used, when the running jaxlib was not measured, or when the user's
    `XLA_FLAGS` already choose the YNN fusion setting; returns the flag string it added
    otherwise. Flags added after JAX's backend started change nothing (no public JAX API tells
    whether it has). `environ` defaults to `os.environ`; only then is this process ever
    re-executed (another mapping is not this process's environment).
    """
    this_process = environ is None
    environ = os.environ if environ is None else environ
    if _accelerator_expected(environ):
        return None
    if relaunch and this_process:
        use_tcmalloc()
    flags = CPU_XLA_FLAGS.get(_jaxlib_version() or (0, 0))
    if flags is None or YNN_FUSION_FLAG in environ.get("XLA_FLAGS", ""):
        return None
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {flags}".strip()
    return flags


def ynn_fusions_in(compiled_text: str) -> bool:
    """Whether a compiled program's HLO text still routes work through YNNPACK fusions."""
    return "ynn_fusion" in compiled_text
