"""tpt_jax: Thinking Augmented Pre-training on JAX."""
