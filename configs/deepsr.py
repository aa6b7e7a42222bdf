"""DeepSR, the paper protocol (20 residual blocks, 64 features, Adam 1e-4, 50 epochs).

Run:
    python launch/main.py --config=configs/deepsr.py:scale=8
    python launch/main.py --config=configs/deepsr.py:scale=8,quick      # 2-core CPU, minutes
    python launch/main.py --config=configs/deepsr.py:scale=12 --config.model.global_skip=image   # the paper text's skip
"""

from petsr_jax.config import build_config


def get_config(arg=None):
    return build_config("deepsr", arg)
