"""Where a run's files live: one output root, paths relative to the file that set them.

A run names one output root (`run.root`, local or gs://) and an experiment name (`run.name`,
by default the config file's stem). Every path left empty derives from them:

    <root>/<name>/                  the run folder: checkpoints, metrics, TensorBoard, eval, export
    <root>/<name>/thinking/         `tpt think` output (shard-*/chunk-*.jsonl)
    <root>/data/<data.name>/vocab.model, .../prepared/
                                    the vocabulary and prepared rows, shared by every experiment
                                    that names the same dataset (vanilla and TPT runs do)

A path may also say `{root}` or `{name}` (`init_from: "{root}/models/qwen3-8b"`).
A corpus can name think outputs (`think_outputs: [think_qwen3-8b]`: an experiment name under the
same root, or a folder), so `think -> prepare` chains by construction. A relative path resolves
against the folder of the config file that set it (a path given on the command line, against the
working directory), so a config works from any directory.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from tpt_jax.config._schema import Config, CorpusConfig, origin_of
from tpt_jax.errors import ConfigError

THINKING_FOLDER = "thinking"
THINK_CHUNKS = os.path.join("shard-*-of-*", "chunk-*.jsonl")  # the layout tpt think writes
PACKAGE_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)
# Text a shipped example leaves for the user to fill in.
_PLACEHOLDER = re.compile(r"YOUR[_-]|CHANGE[_-]?ME|/path/to/|<[^<>]*>|\bVLLM_HOST\b")
# Cloud Storage bucket names: lower case, digits, dashes, underscores and dots, 3 to 63 (222
# with dots) characters, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def locate(path: str) -> str:
    """A config file as given, or else the same name among the configs shipped in the package
    (`configs/demo.yaml` works from any directory, and after a wheel install)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    inner = path.removeprefix("configs" + os.sep)
    packaged = os.path.join(PACKAGE_CONFIGS, inner)
    return packaged if os.path.exists(packaged) else path


def _is_remote(path: str) -> bool:
    return "://" in path


def _path_fields(obj, prefix: str):
    """(dotted key, holder, field name) of every field the schema marks as a path."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _path_fields(value, dotted + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _path_fields(item, f"{dotted}[{i}].")
        elif f.metadata.get("path"):
            yield dotted, obj, f.name


def _file_of(origin: str) -> str | None:
    if origin == "the defaults" or origin.startswith("override "):
        return None
    return origin


def _relative_to(base_dir: str, value: str) -> str:
    """`value` as an absolute local path (a saved config then reloads to the same places)."""
    if not value or _is_remote(value) or value.startswith("{"):
        return value
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _resolve_relative(cfg: Config) -> None:
    """Rewrites, in place, relative local paths as absolute: against the folder of the file that
    set them, or the working folder (the command line and the defaults)."""
    for dotted, holder, name in list(_path_fields(cfg, "")):
        config_file = _file_of(origin_of(cfg.sources, dotted))
        base_dir = os.path.dirname(os.path.realpath(config_file)) if config_file else os.getcwd()
        value = getattr(holder, name)
        if name == "template" and not _looks_like_file(value):
            continue  # a built-in template's name
        if isinstance(value, list):
            keep = _is_experiment_name if name == "think_outputs" else lambda v: False
            new = [v if keep(v) else _relative_to(base_dir, v) for v in value]
        else:
            new = _relative_to(base_dir, value)
        object.__setattr__(holder, name, new)


def _looks_like_file(value: str) -> bool:
    return os.sep in value or value.endswith(".txt")


def _is_experiment_name(entry: str) -> bool:
    """`think_qwen3-8b` names an experiment under run.root; `./out`, `a/b`, `gs://..` are folders."""
    return not _is_remote(entry) and os.sep not in entry and not entry.startswith((".", "~"))


def _corpus_from_think(corpus: CorpusConfig, root: str) -> None:
    folders = []
    for entry in corpus.think_outputs:
        is_name = _is_experiment_name(entry)
        folders.append(os.path.join(root, entry, THINKING_FOLDER) if is_name else entry)
    chunks = [os.path.join(folder, THINK_CHUNKS) for folder in folders]
    # A saved (resolved) config lists them already: loading it again adds nothing.
    new = [c for c in chunks if c not in corpus.paths]
    object.__setattr__(corpus, "paths", [*corpus.paths, *new])


def finish_paths(cfg: Config, config_path: str | None) -> Config:
    """The config with relative paths resolved and every empty output path derived from
    `run.root` and `run.name` (see the module docstring). Mutates the freshly built `cfg`."""
    _resolve_relative(cfg)
    run, data = cfg.run, cfg.data
    name = run.name or (
        os.path.splitext(os.path.basename(config_path))[0] if config_path else "run"
    )
    object.__setattr__(run, "name", name)
    root = run.root.rstrip("/") if run.root.rstrip("/").partition("://")[2] else run.root
    object.__setattr__(run, "root", root)
    for _, holder, field_name in list(_path_fields(cfg, "")):
        value = getattr(holder, field_name)
        if isinstance(value, list):
            new = [_fill(v, root, name) for v in value]
        else:
            new = _fill(value, root, name)
        object.__setattr__(holder, field_name, new)
    ckpt = cfg.checkpoint
    if not ckpt.output_dir:
        object.__setattr__(ckpt, "output_dir", root)
    if not ckpt.run_name:
        object.__setattr__(ckpt, "run_name", name)
    if not cfg.think.output_dir:
        object.__setattr__(cfg.think, "output_dir", os.path.join(root, name, THINKING_FOLDER))
    for corpus in [*data.corpora, cfg.think.corpus]:
        if corpus.think_outputs:
            _corpus_from_think(corpus, root)
    if data.corpora or data.source == "prepared":
        dataset = os.path.join(root, "data", data.name or name)
        if not data.name:
            object.__setattr__(data, "name", name)
        if not data.vocab_path:
            object.__setattr__(data, "vocab_path", os.path.join(dataset, "vocab.model"))
        if not data.prepared_dir:
            object.__setattr__(data, "prepared_dir", os.path.join(dataset, "prepared"))
    return cfg


def _fill(value, root: str, name: str):
    """`{root}` and `{name}` in a path: the run's root and experiment name."""
    if not isinstance(value, str) or "{" not in value:
        return value
    return value.replace("{root}", root).replace("{name}", name)


def check_placeholders(cfg: Config) -> None:
    """A path or address still holding an example's placeholder names its key."""
    keyed = [*_path_fields(cfg, ""), ("think.address", cfg.think, "address")]
    for dotted, holder, name in keyed:
        value = getattr(holder, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and _PLACEHOLDER.search(item):
                raise ConfigError(
                    f"config key '{dotted}': {item!r} is a placeholder "
                    f"({origin_of(cfg.sources, dotted)}); set it, e.g. {dotted}=... on the "
                    "command line, or set run.root and leave the path empty to derive it"
                )


def check_paths(cfg: Config) -> None:
    """What `tpt config` adds to the static checks: every path could exist.

    Inputs on this machine exist (a glob matches a file); bucket names are valid; an output
    folder does not lie under a file. Remote objects are not looked up (no network).
    """
    check_placeholders(cfg)
    _check_shared_output(cfg)
    for dotted, holder, name in _path_fields(cfg, ""):
        value = getattr(holder, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and (name != "template" or _looks_like_file(item)):
                _check_one(cfg, dotted, item, name)


# The most chips one host of a slice carries: v5e and v6e hosts up to 8, v4 and v5p hosts 4.
_CHIPS_PER_HOST = {"v5litepod": 8, "v5e": 8, "v6e": 8, "v4": 4, "v5p": 4, "v3": 4, "v2": 4}


def _hosts(cfg: Config) -> int:
    from tpt_jax.config._validate import topology_chips

    topology = cfg.mesh.topology
    if not topology:
        return 1
    chips, family = topology_chips(topology), topology.rpartition("-")[0]
    per_host = _CHIPS_PER_HOST.get(family, 4)
    hosts = 1 if chips <= per_host else chips // min(per_host, 4)
    return hosts * cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp


def _check_shared_output(cfg: Config) -> None:
    """Every host of a pod writes (checkpoints) or reads (rows) the same folder: a local one
    would be a different folder on each host."""
    hosts = _hosts(cfg)
    key = "think.output_dir" if cfg.think.corpus.paths else "checkpoint.output_dir"
    value = cfg.think.output_dir if cfg.think.corpus.paths else cfg.checkpoint.output_dir
    if hosts > 1 and not _is_remote(value):
        shown = key if key in cfg.sources else "run.root"  # set itself, or derived
        raise ConfigError(
            f"config key '{shown}': {value} is a local folder but mesh.topology "
            f"{cfg.mesh.topology} spans {hosts} hosts, each of which would write its own; give "
            f"run.root=gs://BUCKET/... ({origin_of(cfg.sources, shown)})"
        )


# Keys whose local paths must exist before the first stage runs. Outputs of an earlier stage (the
# vocabulary, prepared rows, think outputs, exported models) and evaluation sets are not yet.
_INPUT_NAMES = ("init_from",)
_INPUT_KEYS = ("think.model_dir", "think.corpus.paths", "think.template")


def _is_input(cfg: Config, dotted: str, name: str) -> bool:
    plain = re.sub(r"\[\d+\]", "", dotted)
    if plain == "think.model_dir" and cfg.think.backend == "teacher":
        return False
    return (
        plain in _INPUT_KEYS
        or name in _INPUT_NAMES
        or plain == "data.corpora.paths"  # think outputs are skipped below: not written yet
    )


def _check_one(cfg: Config, dotted: str, item: str, name: str) -> None:
    where = origin_of(cfg.sources, dotted)
    if item.startswith("gs://"):
        bucket = item[len("gs://") :].split("/", 1)[0]
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ConfigError(
                f"config key '{dotted}': {bucket!r} in {item} cannot be a Cloud Storage bucket "
                f"name (lower-case letters, digits, '-', '_', '.') ({where})"
            )
        return
    if _is_remote(item):
        return
    local = os.path.expanduser(item)
    if _is_input(cfg, dotted, name):
        if THINK_CHUNKS in local:
            return
        if glob.has_magic(local) and not glob.glob(local):
            raise ConfigError(f"config key '{dotted}': {item} matches no file ({where})")
        if not glob.has_magic(local) and not os.path.exists(local):
            raise ConfigError(f"config key '{dotted}': {item} does not exist ({where})")
        return
    existing = os.path.abspath(local)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) and existing != os.path.abspath(local):
        raise ConfigError(
            f"config key '{dotted}': {item} cannot be created: {existing} is a file ({where})"
        )
