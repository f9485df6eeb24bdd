"""`tpt demo`: held-out accuracy against training tokens, vanilla vs TPT, over several seeds, in
the abundant and the data-constrained setting, on the synthetic testbed and a CPU."""

from tpt_jax.demo._run import DemoOptions, eval_steps, run_demo

__all__ = ["DemoOptions", "eval_steps", "run_demo"]
