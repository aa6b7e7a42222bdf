"""Shared test set-up: four fake CPU devices (sharding tests), absl flags parsed (Grain)."""

import os
import subprocess
import sys
import textwrap

# Must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from petsr_jax import cpu  # noqa: E402

cpu.configure()  # the same XLA flags as the launch scripts (subprocess tests compare to us)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Slice caches and cohorts of a test run stay in its temporary folder."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("PETSR_CACHE_DIR", str(base / "slice_cache"))
    monkeypatch.setenv("PETSR_DATA_DIR", str(base / "cohorts"))


def fresh_python_env(**changes) -> dict:
    """This process's environment for a fresh Python: without the four fake devices of
    `XLA_FLAGS` (one device, as a real run has) and without a preloaded allocator."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LD_PRELOAD")}
    env.update(changes)
    return env


def compilation_cache_env(folder) -> dict[str, str]:
    """Environment entries that make launched processes share JAX's persistent compilation
    cache in `folder`: a later process loads the programs an earlier one compiled (the same
    executables, so the same numbers) instead of compiling them again."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(folder),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_python(code: str, *args: str, **env_changes) -> subprocess.CompletedProcess:
    """Run `code` (dedented) in a fresh Python with `args` as its argv; output captured."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=fresh_python_env(**env_changes),
        capture_output=True,
        text=True,
        timeout=600,
    )


def blob_volume(seed: int, slices: int = 8, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A small PET-like volume (smooth blobs, Bq/mL-sized values) and its 'brain' mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    vol = np.zeros((slices, size, size), np.float32)
    for _ in range(6):
        cz, cy, cx = rng.uniform([0, 8, 8], [slices, size - 8, size - 8])
        r = rng.uniform(2, 6)
        vol += rng.uniform(2e3, 1e4) * np.exp(
            -((z - cz) ** 2 / 4 + (y - cy) ** 2 / r**2 + (x - cx) ** 2 / r**2)
        )
    vol += rng.uniform(0, 200, vol.shape).astype(np.float32)
    mask = ((y - size / 2) ** 2 + (x - size / 2) ** 2 < (size / 3) ** 2) & (z >= 2)
    return vol, mask.astype(np.uint8)


def make_nifti_root(root, n_patients: int = 4, slices: int = 8, size: int = 32):
    """A data root of NIfTI patients with brain masks, laid out as README 'Your own data' says."""
    from petsr_jax import io
    from petsr_jax.volume import Volume

    root.mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for p in range(n_patients):
        vol, mask = blob_volume(p, slices, size)
        pid = f"pat-{p:02d}"
        io.write_nifti(
            Volume(vol, (2.0, 2.0, 2.0), units="BQML", patient_id=pid), root / f"{pid}.nii.gz"
        )
        io.write_nifti(
            Volume(mask.astype(np.float32), (2.0, 2.0, 2.0), patient_id=pid),
            root / "masks" / f"{pid}.nii.gz",
        )
    return root


@pytest.fixture(scope="session")
def nifti_root(tmp_path_factory):
    return make_nifti_root(tmp_path_factory.mktemp("nifti_root"))


@pytest.fixture(scope="session")
def tiny_deepsr_workdir(nifti_root, tmp_path_factory):
    """A finished tiny DeepSR run on `nifti_root`, trained once per test session."""
    from petsr_jax import train
    from petsr_jax.config import build_config

    workdir = tmp_path_factory.getbasetemp() / "tiny_deepsr_run"
    config = build_config("deepsr", f"tiny,data.root={nifti_root}")
    train.train_and_evaluate(config, workdir, progress=False)  # returns at once when finished
    return workdir


@pytest.fixture(scope="session")
def tiny_srcnn_workdir(nifti_root, tmp_path_factory):
    """A finished two-epoch tiny SRCNN run on `nifti_root` (8 steps, checkpoints at 4 and 8),
    trained once per test session: the uninterrupted run that interrupted, killed and
    multi-process runs of the same config must end equal to. Read it, never write into it."""
    from petsr_jax import train
    from petsr_jax.config import build_config

    workdir = tmp_path_factory.getbasetemp() / "tiny_srcnn_run"
    config = build_config("srcnn", f"tiny,data.root={nifti_root},train.epochs=2")
    train.train_and_evaluate(config, workdir, progress=False)  # returns at once when finished
    return workdir


@pytest.fixture(scope="session")
def tiny_deepsr(tiny_deepsr_workdir):
    """That run loaded for inference (`petsr_jax.load`)."""
    import petsr_jax

    return petsr_jax.load(tiny_deepsr_workdir)


# --------------------------------------- float64 reference convolution (test_perf, test_onednn)


def _windows(x_padded: np.ndarray, kh: int, kw: int, h: int, w: int) -> np.ndarray:
    """[N, h, w, C, kh, kw] view of every kh×kw window of a padded NHWC array."""
    view = np.lib.stride_tricks.sliding_window_view(x_padded, (kh, kw), axis=(1, 2))
    return view[:, :h, :w]


def reference_conv_and_grads(x, kernel, bias, g):
    """y = conv(x, kernel) + bias ("SAME", stride 1) and the VJP of `g`, in float64."""
    x, kernel, bias, g = (np.asarray(a, np.float64) for a in (x, kernel, bias, g))
    kh, kw, _, _ = kernel.shape
    n, h, w, _ = x.shape
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    win = _windows(xp, kh, kw, h, w)  # [n, h, w, cin, kh, kw]
    y = np.einsum("nyxcij,ijco->nyxo", win, kernel) + bias
    dkernel = np.einsum("nyxcij,nyxo->ijco", win, g)
    dbias = g.sum(axis=(0, 1, 2))
    # dx[n, p + (i, j) - pad, c] += g[n, p, o] * kernel[i, j, c, o]
    dxp = np.zeros_like(xp)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i : i + h, j : j + w] += np.einsum("nyxo,co->nyxc", g, kernel[i, j])
    dx = dxp[:, ph : ph + h, pw : pw + w]
    return y, dx, dkernel, dbias


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_train_gradients_match_xla(name: str, conv: str, **fields) -> None:
    """Same params, same batch: the loss gradient with `model.conv=conv` equals XLA autodiff's
    (plain `jax.grad` through `flax.linen.Conv`) to float32 rounding."""
    import jax

    from petsr_jax import train
    from petsr_jax.config import build_config
    from petsr_jax.models import create_model
    from petsr_jax.task import Bicubic, Task

    hr = jax.random.uniform(jax.random.key(3), (2, 24, 24, 1))
    grads = {}
    for impl in ("flax", conv):
        config = build_config(name, ",".join(f"{k}={v}" for k, v in fields.items()))
        with config.unlocked():
            config.model.conv = impl
        model = create_model(config)
        params = model.init(jax.random.key(0), hr)["params"]
        task, keys = Task(Bicubic(8)), jax.random.split(jax.random.key(1), 2)
        loss = jax.jit(jax.grad(train.mse_loss), static_argnums=(1, 2))
        grads[impl] = loss(params, model, task, {"hr": hr}, keys)
    assert jax.tree.structure(grads["flax"]) == jax.tree.structure(grads[conv])
    got = dict(jax.tree_util.tree_leaves_with_path(grads[conv]))
    for path, want in jax.tree_util.tree_leaves_with_path(grads["flax"]):
        assert rel_err(got[path], want) < 2e-5, jax.tree_util.keystr(path)
