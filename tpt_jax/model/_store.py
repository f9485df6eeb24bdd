"""A converted model on disk: `model.yaml` (the model section of a config) + Orbax `params/`.

The folder is what `tpt convert from-hf` writes and what `checkpoint.init_from` and
`tpt convert to-hf` read. `model.yaml` can also serve as a `base:` of any run config.
"""

from __future__ import annotations

import os
import tempfile

import jax
import orbax.checkpoint as ocp
import yaml

from tpt_jax import storage
from tpt_jax.config import ModelConfig, load_config, to_dict
from tpt_jax.errors import CheckpointError

MODEL_FILE = "model.yaml"
PARAMS_DIR = "params"


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def save_model(folder: str, cfg: ModelConfig, params: dict) -> None:
    """Writes model.yaml and the parameters (numpy or jax arrays) as an Orbax checkpoint."""
    text = yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False)
    storage.write_bytes(os.path.join(folder, MODEL_FILE), text.encode())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(_abs(os.path.join(folder, PARAMS_DIR)), params, force=True)
    checkpointer.wait_until_finished()


def load_model_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, MODEL_FILE)
    if not storage.exists(path):
        raise CheckpointError(
            f"{folder}: no {MODEL_FILE}; is this a folder written by `tpt convert from-hf`?"
        )
    if storage.is_remote(path):  # the config loader reads local files
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, MODEL_FILE)
            storage.write_bytes(local, storage.read_text(path).encode())
            return load_config(local).model
    return load_config(path).model


def check_shapes(saved: dict, expected: dict, where: str) -> None:
    """Refuses a checkpoint whose parameter tree or shapes differ from the config's, naming one."""
    saved_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
    for key, spec in jax.tree_util.tree_leaves_with_path(expected):
        name = jax.tree_util.keystr(key)
        if name not in saved_flat:
            raise CheckpointError(
                f"{where}: parameter {name} required by the config is not in the checkpoint"
            )
        got = tuple(saved_flat.pop(name).shape)
        if got != tuple(spec.shape):
            raise CheckpointError(
                f"{where}: parameter {name} has shape {list(got)} in the checkpoint but "
                f"{list(spec.shape)} in the config"
            )
    if saved_flat:
        raise CheckpointError(
            f"{where}: checkpoint parameter {next(iter(saved_flat))} is not in the config"
        )


def restore_params(folder: str, target: dict) -> dict:
    """Restores params into `target`'s shapes, dtypes and (if set) shardings.

    Args:
        folder: a folder written by `save_model`.
        target: tree of jax.ShapeDtypeStruct (with `.sharding` to place shards on a mesh).
    """
    path = _abs(os.path.join(folder, PARAMS_DIR))
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = checkpointer.metadata(path).item_metadata.tree
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(
            f"{folder}: no readable Orbax parameters under {PARAMS_DIR}/ ({e})"
        ) from None
    check_shapes(saved, target, folder)
    return checkpointer.restore(path, target)
