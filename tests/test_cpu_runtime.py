"""Process set-up for CPU runs: the XLA flag takes effect, tcmalloc is taken once and safely.

The XLA flag is checked where it acts: in a fresh process, the compiled HLO holds no YNN fusion.
The allocator is checked by what it is for: a large block reused without page faults.
"""

import functools
import sys

import pytest
from conftest import run_python

from petsr_jax.cpu import runtime


def test_configure_leaves_a_users_choice_and_accelerators_alone(monkeypatch):
    monkeypatch.setattr(runtime, "_jaxlib_version", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    assert runtime.configure(env) == runtime.CPU_XLA_FLAGS[(0, 10)]
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        runtime.CPU_XLA_FLAGS[(0, 10)],
    ]
    chosen = {"XLA_FLAGS": f"{runtime.YNN_FUSION_FLAG}=individual_dot", "JAX_PLATFORMS": "cpu"}
    assert runtime.configure(chosen) is None
    assert chosen["XLA_FLAGS"] == f"{runtime.YNN_FUSION_FLAG}=individual_dot"
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert runtime.configure(gpu) is None and "XLA_FLAGS" not in gpu
    monkeypatch.setattr(runtime, "_jaxlib_version", lambda: (0, 4))  # a version never measured
    assert runtime.configure({"JAX_PLATFORMS": "cpu"}) is None


@pytest.mark.skipif(
    runtime._jaxlib_version() not in runtime.CPU_XLA_FLAGS,
    reason="no XLA CPU flags for this jaxlib",
)
def test_configured_process_compiles_convolutions_without_ynn_fusions():
    code = (
        "from petsr_jax.cpu import runtime; runtime.configure()\n"
        "import jax, jax.numpy as jnp\n"
        "from petsr_jax.cpu.fast_conv import conv2d_same\n"
        "x, k, b = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones(4)\n"
        "f = jax.jit(jax.grad(lambda k: conv2d_same(x, k, b).sum()))\n"
        "print(runtime.ynn_fusions_in(f.lower(k).compile().as_text()))\n"
    )
    out = run_python(code, JAX_PLATFORMS="cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------------ the allocator

needs_tcmalloc = pytest.mark.skipif(
    runtime.find_tcmalloc() is None,
    reason="tcmalloc not installed (apt-get install libtcmalloc-minimal4)",
)

RELAUNCH_PROBE = """
import os, sys
print("start", os.getpid(), flush=True)
from petsr_jax import cpu
cpu.configure(relaunch=True)
print("running", os.getpid(), cpu.runtime.tcmalloc_loaded(), sys.argv[1:], flush=True)
"""


@needs_tcmalloc
def test_launch_scripts_reexecute_once_onto_tcmalloc_with_the_same_arguments():
    out = run_python(RELAUNCH_PROBE, "--config=x", "two words")
    assert out.returncode == 0, out.stderr
    lines = [line.split(maxsplit=2) for line in out.stdout.splitlines()]
    assert [line[0] for line in lines] == ["start", "start", "running"]  # one re-execution
    assert lines[0][1] == lines[1][1] == lines[2][1]  # the same process, as schedulers see it
    assert lines[2][2] == "True ['--config=x', 'two words']"


def test_the_system_allocator_can_be_kept_and_a_typo_is_an_error():
    out = run_python(RELAUNCH_PROBE, PETSR_ALLOCATOR="system")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["start", "running"]
    assert out.stdout.splitlines()[-1].endswith("False []")
    typo = run_python(RELAUNCH_PROBE, PETSR_ALLOCATOR="tcmaloc")
    assert typo.returncode != 0 and "PETSR_ALLOCATOR must be" in typo.stderr


def test_use_tcmalloc_prepends_the_library_and_never_loops(monkeypatch, tmp_path):
    library = tmp_path / runtime.TCMALLOC_LIBRARIES[0]
    library.write_bytes(b"")
    assert runtime.find_tcmalloc([str(tmp_path / "missing"), str(tmp_path)]) == str(library)
    monkeypatch.setattr(runtime, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: str(library))
    monkeypatch.setattr(runtime, "_can_reexecute", lambda: True)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "launch/main.py", "--flag"])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.delenv("PETSR_ALLOCATOR", raising=False)
    calls = []
    assert not runtime.use_tcmalloc(execve=lambda *a: calls.append(a))
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == [sys.executable, "-u", "launch/main.py", "--flag"]
    assert env["LD_PRELOAD"] == f"{library} libother.so"
    # The preload was tried but did not take: stay, rather than re-executing forever.
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    assert not runtime.use_tcmalloc(execve=lambda *a: calls.append(a)) and len(calls) == 1
    # Accelerator runs keep their allocator.
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not runtime.use_tcmalloc(execve=lambda *a: calls.append(a)) and len(calls) == 1


def test_notebooks_and_worker_processes_are_never_reexecuted(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "launch/main.py"])
    monkeypatch.setattr(sys, "argv", ["launch/main.py"])
    assert runtime._can_reexecute()
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a data-loader worker
        assert pool.apply(runtime._can_reexecute) is False
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # an interactive session
    assert not runtime._can_reexecute()


@functools.cache
def _faults_of_second_allocation(allocator: str) -> int:
    """Page faults of allocating, touching and freeing 256 MiB, the second of two times, from a
    worker thread — the way XLA:CPU allocates a step's temporaries."""
    code = """
import ctypes, resource, threading
from petsr_jax import cpu
cpu.configure(relaunch=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size, faults = 256 << 20, []
def touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(2):
    t = threading.Thread(target=touch); t.start(); t.join()
print(cpu.runtime.tcmalloc_loaded(), faults[1])
"""
    out = run_python(code, PETSR_ALLOCATOR=allocator)
    assert out.returncode == 0, out.stderr
    loaded, faults = out.stdout.split()[-2:]
    assert loaded == str(allocator == "tcmalloc")
    return int(faults)


@needs_tcmalloc
def test_on_tcmalloc_a_large_block_is_reused_without_page_faults():
    """Why the launch scripts move onto tcmalloc: glibc maps such a block afresh every time."""
    pages = (256 << 20) // 4096
    assert _faults_of_second_allocation("system") > pages // 2
    assert _faults_of_second_allocation("tcmalloc") < pages // 50
