"""Small-scale reproductions of paper figures: run as ``python -m experiments.NAME --outdir DIR``."""
