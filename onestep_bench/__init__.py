"""A JAX/Flax benchmark harness for one-step generative models."""
