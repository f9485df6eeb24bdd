"""tpt_jax: Thinking Augmented Pre-training on JAX."""

import os

# Orbax resolves gs:// paths with etils, which prefers TensorFlow's GCS client when TensorFlow is
# installed (seqio brings it). Training never imports TensorFlow: use gcsfs instead, which also
# honours STORAGE_EMULATOR_HOST. Set EPATH_USE_TF=true to get the old behaviour back.
os.environ.setdefault("EPATH_USE_TF", "false")
