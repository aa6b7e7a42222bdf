"""Experiments built from many training runs: the paper's tables and figures (`reproduce`) and
one-field sweeps such as depth or learning rate (`ablation`)."""
