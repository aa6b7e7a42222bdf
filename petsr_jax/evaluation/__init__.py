"""What a trained model is worth, and the files that say so.

predict.py    the one batched loop every caller runs a model through (`map_batches`)
evaluate.py   per-slice PSNR / SSIM / LPIPS of a split, bicubic beside the model, per domain
regional.py   grey-matter and lesion activity recovery in physical units
report.py     results.json, results.md and the comparison figure of a finished run
nema.py       NEMA IQ phantom scans: sphere FWHM and recovery, background, EARL bands, before/after
"""
