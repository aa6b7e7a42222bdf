"""Multi-scale SRCNN, the paper protocol: 9×9/64 → 1×1/32 → 5×5/1, Adam at 1e-3 for 50 epochs.

The protocol is `base_config("srcnn")`, the library's defaults (so a trained run loads without
this file); this file adds its variants. The choices it makes:

- The network (Sec. 3.1.1): three convolutions on the bicubic-upsampled slice, with PyTorch's
  default initialisation, which the authors trained with. The `model.num_blocks`, `width`,
  `global_skip` and `residual_scale` fields are DeepSR's and unused here.
- Training (Sec. 3.2): MSE loss, Adam at 1e-3 for faster convergence, 50 epochs, batch 8;
  validation and a checkpoint once per epoch.
- Data: the embedded paper-size cohort (33 patients × 89 slices of 384²) split by patient
  20/4/9 as the paper, whole slices in physical units, random flips; validation and test on the
  slices inside the brain mask.
- Evaluation: PSNR, SSIM and LPIPS of the params with the best validation PSNR, beside the
  bicubic baseline.

Run from the repository root:

    python launch/main.py --config=configs/srcnn.py:scale=8               # the paper protocol
    python launch/main.py --config=configs/srcnn.py:scale=8,gpu           # on one GPU, bfloat16
    python launch/main.py --config=configs/srcnn.py:scale=8,quick         # 2-core CPU, minutes
    python launch/main.py --config=configs/srcnn.py:scale=8,quick,paper   # the authors' domain
    python launch/main.py --config=configs/srcnn.py:scale=8,quick,mr     # PET + T1 input
    python launch/main.py --config=configs/srcnn.py:scale=16 --config.train.epochs=100

After the colon come variants by name (`VARIANTS` below, applied first, in the order given) and
`field=value` overrides typed like the field (`train.lr=3e-4`, or the short `lr=3e-4`). Every
field and what it means: `petsr_jax.config.base_config`.
"""

from petsr_jax.config import MR_VARIANT, SCANNER_VARIANT, apply_arg, base_config


def get_config(arg=None):
    """The paper protocol, with the variants and overrides that `arg` names; locked."""
    return apply_arg(base_config("srcnn"), arg, VARIANTS)


VARIANTS = {
    # A run that finishes on a 2-core CPU in minutes (cohort generation included) and still
    # shows the model clearly above bicubic: the small cohort (12 patients × 40 slices of 128²),
    # random 64² crops, 40 epochs.
    "quick": {
        "data.cohort": "small",
        "data.split": "8/2/2",
        "data.crop_size": 64,
        "train.batch_size": 16,
        "train.epochs": 40,
        "train.eval_every_steps": 200,
        "train.checkpoint_every_steps": 200,
        "eval.lpips": False,
    },
    # Trained on what a scanner produces, for enhancing real scans: see config.SCANNER_VARIANT.
    "scanner": SCANNER_VARIANT,
    # MR-guided, anchored to a PET-only network: see config.MR_VARIANT.
    "mr": MR_VARIANT,
    # Unit-test sized: a few steps on the tiny cohort.
    "tiny": {
        "data.cohort": "tiny",
        "data.split": "2/1/1",
        "data.crop_size": 32,
        "train.batch_size": 4,
        "train.epochs": 1,
        "train.eval_every_steps": 4,
        "train.checkpoint_every_steps": 4,
        "train.log_every_steps": 2,
        "eval.lpips": False,
        "eval.num_figure_slices": 2,
    },
    # The authors' protocol (their released code): slices min–max scaled to 8 bits, the input
    # made by PIL's 8-bit bicubic and scored with the paper's metrics, batch 16, no
    # augmentation, the final weights. Combines with the others: `quick,paper`.
    "paper": {
        "data.domain": "paper",
        "data.flip": False,
        "train.batch_size": 16,
        "eval.weights": "final",
    },
    # One GPU: bfloat16 convolutions (params and Adam stay float32), whole slices, and the
    # authors' batch of 16 (their code, trained on one 24 GB Quadro P6000); evaluation in
    # larger batches.
    "gpu": {
        "compute_dtype": "bfloat16",
        "data.crop_size": 0,
        "train.batch_size": 16,
        "eval.batch_size": 32,
    },
}
