"""lm-eval `process_docs` filters that keep one subject of a file holding every subject.

`!function tpt_jax.eval.subjects.<subject>` in a task yaml keeps the records whose `subject`
field equals <subject>: MMLU's per-subject tasks (which pick a subject by the dataset config
name on the Hub) then read one local file of all subjects, as cais/mmlu's "all" config is.
"""

from __future__ import annotations

import functools

from tpt_jax.errors import TptError


def keep_subject(dataset, subject: str):
    """The records of `dataset` (a datasets.Dataset) whose `subject` is `subject`.

    Raises:
        TptError: the records have no `subject` field.
    """
    if "subject" not in dataset.column_names:
        raise TptError(
            f"the task for subject {subject!r} reads records without a 'subject' field: give "
            "it one file of every subject with their 'subject' field (cais/mmlu, config "
            "'all'; see README, Evaluation)"
        )
    return dataset.filter(lambda doc: doc["subject"] == subject)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return functools.partial(keep_subject, subject=name)
