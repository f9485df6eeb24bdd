"""Thinking generation: sampling, the generation engine, prompts, backends, offline driver.

Nothing here is imported by training; JetStream imports stay in the modules that serve.
"""
