"""Evaluators: one sampling + scoring path for every method (see runner.py)."""
