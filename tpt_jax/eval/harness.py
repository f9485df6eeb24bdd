"""lm-eval tasks on local files: the task yamls `tpt eval` writes, and the harness run.

A task of kind "lm_eval" names a task lm-eval knows (its own, or ours under tpt_jax/eval/tasks)
and the local files it reads; `local_task_yaml` writes a yaml that includes that task's yaml and
replaces only where its data come from (and, when set, its shots and generation cap), so
prompts, few-shot exemplars, filters and metrics stay lm-eval's. Nothing is downloaded.

A group (mmlu_flan_cot_fewshot, mmlu_pro: one lm-eval task per subject) is run as its leaf
tasks, each named `<name>_<subject>` and reading the same local files, under a group named
`<name>` that aggregates them as lm-eval's group does. Where a leaf picks its subject by a
dataset config name (MMLU's `dataset_name: abstract_algebra`), it keeps the records whose
`subject` field is that name (`tpt_jax.eval.subjects`), so one file of every subject (as
cais/mmlu's "all") serves all of them; MMLU-Pro's leaves filter by `category` themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import yaml

TASKS_DIR = os.path.join(os.path.dirname(__file__), "tasks")  # our own task yamls


def task_manager(include_dirs: list[str]):
    """lm-eval's task registry, with our task yamls and `include_dirs` added."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[TASKS_DIR, *include_dirs])


@functools.cache
def _registry():
    """lm-eval's registry with our yamls, indexed once per process (indexing reads every task
    yaml lm-eval ships: about 7 s here, which every evaluation during training would pay)."""
    return task_manager([])


def base_yaml(manager, task: str) -> str:
    """The yaml file that defines lm-eval task `task`.

    Raises:
        KeyError: lm-eval knows no task of that name (or it is a group, not a task).
    """
    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise KeyError(task)
    return str(entry.yaml_path)


def leaf_tasks(manager, name: str) -> list[str]:
    """The tasks a group or tag of lm-eval's registry runs (the name itself for a task).

    Raises:
        KeyError: lm-eval knows no task, group or tag of that name.
    """
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None:
        raise KeyError(name)
    if entry.kind == Kind.TAG:
        return [n for n, e in manager.task_index.items() if name in e.tags and e.kind == Kind.TASK]
    if entry.kind != Kind.GROUP:
        return [name]
    leaves = []
    for item in entry.cfg.get("task", []):
        if isinstance(item, dict):  # an inline subgroup: {group: ..., task: [...]}
            for sub in item.get("task", []):
                leaves.extend(leaf_tasks(manager, sub))
        else:
            leaves.extend(leaf_tasks(manager, item))
    return list(dict.fromkeys(leaves))


def local_task_yaml(spec, manager, task: str | None = None, name: str | None = None) -> dict:
    """The yaml (as a dict) of `spec` (an EvalTaskConfig of kind "lm_eval"): lm-eval task
    `task` (default spec.task) under `name` (default spec.name) reading `spec.path` (test
    split) and `spec.fewshot_path` (its few-shot split, when the task draws exemplars from
    one)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = base_yaml(manager, task or spec.task)
    base = load_yaml(path, resolve_func=False)
    files = {"test": spec.path}
    out = {
        "include": path,
        "task": name or spec.name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "test_split": "test",
        "validation_split": None,
        "training_split": None,
    }
    if spec.fewshot_path:
        files["fewshot"] = spec.fewshot_path
        out["fewshot_split"] = "fewshot"
    elif not (base.get("fewshot_config") or {}).get("samples"):
        out["fewshot_split"] = None  # exemplars only where the task writes them out
    out["dataset_kwargs"] = {"data_files": files}
    if spec.shots >= 0:
        out["num_fewshot"] = spec.shots
    if base.get("output_type") == "generate_until" and spec.max_new_tokens:
        out["generation_kwargs"] = {**base.get("generation_kwargs", {}),
                                    "max_gen_toks": spec.max_new_tokens}  # fmt: skip
    return out


def task_yamls(spec, manager) -> dict[str, str]:
    """file name -> yaml text of the task (or the group and its leaf tasks) `spec` runs."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(spec.task)
    if entry is None:
        raise KeyError(spec.task)
    if entry.kind not in (Kind.GROUP, Kind.TAG):
        return {
            f"{spec.name}.yaml": yaml.safe_dump(local_task_yaml(spec, manager), sort_keys=False)
        }
    out, names = {}, []
    for leaf in leaf_tasks(manager, spec.task):
        name = f"{spec.name}_{leaf.removeprefix(spec.task + '_')}"
        text = yaml.safe_dump(local_task_yaml(spec, manager, leaf, name), sort_keys=False)
        subject = (manager.task_index[leaf].cfg or {}).get("dataset_name")
        if subject and not (manager.task_index[leaf].cfg or {}).get("process_docs"):
            text += f"process_docs: !function tpt_jax.eval.subjects.{subject}\n"
        out[f"{name}.yaml"] = text
        names.append(name)
    group = {"group": spec.name, "task": names}
    aggregate = (entry.cfg or {}).get("aggregate_metric_list") if entry.kind == Kind.GROUP else None
    if aggregate:
        group["aggregate_metric_list"] = aggregate
    group["metadata"] = {"version": 1.0}
    out[f"{spec.name}.yaml"] = yaml.safe_dump(group, sort_keys=False)
    return out


def write_task_yamls(specs, folder: str, manager) -> None:
    """The yamls of every spec in `folder` (then a TaskManager including it finds them)."""
    os.makedirs(folder, exist_ok=True)
    for spec in specs:
        for file_name, text in task_yamls(spec, manager).items():
            with open(os.path.join(folder, file_name), "w") as f:
                f.write(text)


def _local_files(spec, folder: str):
    """`spec` reading local copies (in `folder`) of its files on remote storage (gs://): lm-eval's
    json loader reads local paths; evaluation sets are small."""
    from tpt_jax import storage

    copies = {}
    for field in ("path", "fewshot_path"):
        path = getattr(spec, field)
        if path and storage.is_remote(path):
            copies[field] = os.path.join(folder, f"{spec.name}.{field}.{os.path.basename(path)}")
            with open(copies[field], "wb") as f:
                f.write(storage.read_bytes(path))
    return dataclasses.replace(spec, **copies) if copies else spec


def evaluate(lm, specs, limit: int = 0) -> dict:
    """lm_eval.simple_evaluate of the tasks `specs` describe on `lm` (an lm-eval LM).

    The task yamls go to a local temporary folder of this process (every process of a
    multi-host run writes its own). Returns lm-eval's results dict (results, configs, n-shot,
    samples, ...).
    """
    import lm_eval

    with tempfile.TemporaryDirectory(prefix="tpt_lm_eval_tasks_") as folder:
        specs = [_local_files(spec, folder) for spec in specs]
        write_task_yamls(specs, folder, _registry())
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[s.name for s in specs],
            task_manager=task_manager([folder]),
            limit=limit or None,
            log_samples=True,
            bootstrap_iters=0,
        )
