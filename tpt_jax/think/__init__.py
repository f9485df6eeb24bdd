"""Thinking generation: prompts, backends (the local engine of `tpt_jax.generate`, JetStream,
OpenAI-compatible servers, the testbed's teacher), the offline driver and its summary.

Nothing here is imported by training.
"""
