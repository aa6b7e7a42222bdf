"""Multi-scale SRCNN, the paper protocol (9×9/64 → 1×1/32 → 5×5/1, Adam 1e-3, 50 epochs).

Run:
    python launch/main.py --config=configs/srcnn.py:scale=8
    python launch/main.py --config=configs/srcnn.py:scale=8,quick       # 2-core CPU, minutes
"""

from petsr_jax.config import build_config


def get_config(arg=None):
    return build_config("srcnn", arg)
