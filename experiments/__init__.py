"""Experiment configs (ml_collections) and named ablation sweeps."""
