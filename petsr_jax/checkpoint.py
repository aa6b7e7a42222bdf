"""Orbax checkpoints of a run: the last few full states, and the best params by validation PSNR.

`<workdir>/checkpoints/<step>/` holds the train state (params, optimizer state, step, RNG) and
the Grain iterator position, so a rerun resumes exactly where the last save left off.
`<workdir>/best/<step>/` holds params only, kept for the best validation PSNR. Orbax finalises
a step by renaming its temporary folder, so a run killed mid-save leaves the previous step as the
latest restorable one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run; the message says why."""


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class Checkpoints:
    """The two checkpoint managers of a workdir."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        workdir = Path(workdir).absolute()
        self.last = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data_iter"),
        )
        self.best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["val_psnr"], best_mode="max"
            ),
            item_names=("params",),
        )

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def save(self, step: int, state, data_iter_state: dict) -> None:
        self.last.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=ocp.args.JsonSave(data_iter_state),
            ),
        )

    def restore(self, step: int, like_state):
        """(state, data_iter_state) of `step`, laid out like `like_state` (same shardings)."""
        try:
            restored = self.last.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(like_state)),
                    data_iter=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.last.directory}: it is corrupt "
                f"or was written by a different model/config ({type(e).__name__}: {e}). Use a "
                "new workdir, or delete that step to fall back to an earlier one."
            ) from e
        return restored.state, restored.data_iter

    def save_best(self, step: int, params, val_psnr: float) -> None:
        self.best.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
            metrics={"val_psnr": float(val_psnr)},
        )

    def best_step(self) -> int | None:
        return self.best.best_step()

    def restore_best(self, like_params):
        step = self.best.best_step()
        if step is None:
            return None
        restored = self.best.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like_params)))
        )
        return restored.params

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()


def restore_params(workdir: str | Path, like_params, which: str = "best"):
    """Params of a finished workdir without flags or a train state (notebooks, enhancement).

    `which="best"` takes the best validation checkpoint, falling back to the latest full state;
    `"last"` takes the latest full state. Only the params are read (a partial restore).
    """
    workdir = Path(workdir).absolute()
    like = _abstract(like_params)
    if which == "best" and (workdir / "best").is_dir():
        with ocp.CheckpointManager(workdir / "best", item_names=("params",)) as mngr:
            step = mngr.latest_step()
            if step is not None:
                return mngr.restore(
                    step, args=ocp.args.Composite(params=ocp.args.StandardRestore(like))
                ).params
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data_iter")) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(
                f"{workdir} holds no checkpoint (looked in best/ and checkpoints/)"
            )
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": like},
                    partial_restore=True,
                )
            ),
        )
        return restored.state["params"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
