"""Two networks side by side: a PET-only one and one that also sees the MR guidance.

`Anchored` runs `pet` on the PET channels of its input alone (the first `pet_channels`: the
centre slice and its neighbours) and `guided` on all of them (PET, T1, ...), and returns both
outputs as two channels, guided first. What is done with the pair is the task's
(`petsr_jax.task.Task`, `mr.anchor_block`): the guided output keeps, block by block, the activity
the PET-only output finds, so the anatomy may redistribute activity within a block but not move
it into a lesion the PET does not show. Both branches are trained, each against the target.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Anchored(nn.Module):
    """`[N, H, W, C]` → `[N, H, W, 2]`: (guided output, PET-only output)."""

    pet: nn.Module
    guided: nn.Module
    pet_channels: int = 1

    @nn.compact
    def __call__(self, x):
        pet_only = self.pet(x[..., : self.pet_channels])
        guided = self.guided(x)
        return jnp.concatenate([guided, pet_only], axis=-1)
