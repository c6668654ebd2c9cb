"""onestep_bench: a JAX/Flax benchmark harness for one-step generative models."""
