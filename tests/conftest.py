"""Shared test setup: eight fake CPU devices for mesh tests, and tiny HF reference models."""

import os

# Must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# gcsfs's experimental file system first probes a bucket's type over gRPC, which the local GCS
# emulator does not serve (a 60 s timeout per bucket); the core file system goes straight to JSON.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
