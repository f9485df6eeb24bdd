"""SeqIO tasks and mixtures: the single definition of the training data.

Each corpus defines `<name>_vanilla` (the document alone) and, when it has a thinking field,
`<name>_tpt` (the document, then its thinking, joined by `data.tpt_template`). Both tokenize
with a `seqio.SentencePieceVocabulary` and append EOS. The mixture has the configured rates.
Importing this module imports TensorFlow: only `tpt prepare` and tests use it, never training.
"""

from __future__ import annotations

import re
import string

import seqio
import tensorflow as tf

from tpt_jax.config import CorpusConfig, DataConfig
from tpt_jax.data import readers, vocab
from tpt_jax.data.rejects import BadInputError, RejectLog

SPLIT = "train"


class CorpusSource(seqio.DataSource):
    """A seqio DataSource over our corpus readers; one shard per input file.

    `rejects` collects bad records; the caller (prepare) swaps in a log per work item.
    """

    def __init__(self, corpus: CorpusConfig, need_thinking: bool):
        super().__init__(splits=[SPLIT], caching_permitted=False)
        self.corpus = corpus
        self.need_thinking = need_thinking
        self.rejects = RejectLog()
        self._files: list[str] | None = None

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    @property
    def output_features(self):
        return {
            "text": tf.TensorSpec([], tf.string),
            "thinking": tf.TensorSpec([], tf.string),
            "id": tf.TensorSpec([], tf.string),
        }

    def list_shards(self, split: str) -> list[str]:
        if self._files is None:
            # Paths matching no file are reported once by the caller (prepare), not per shard.
            self._files = readers.expand(self.corpus.paths, RejectLog())
        return self._files

    def documents(self, files: list[str]):
        """(text, thinking) of every usable record of `files`, rejecting the unusable ones.

        In strict mode the first bad record ends the stream (an exception would only reach the
        caller wrapped by tf.data); the caller finds it in `rejects.first_error`.
        """
        try:
            yield from self._documents(files)
        except BadInputError:
            return

    def _documents(self, files: list[str]):
        for path in files:
            for line, record in readers.read_records(path, self.rejects):
                doc = readers.to_document(record, self.corpus, path, line, self.rejects)
                if doc is None:
                    continue
                if self.need_thinking and doc.thinking is None:
                    self.rejects.reject(
                        path, line, "no thinking: a tpt task record needs its thinking field"
                    )
                    continue
                yield {"text": doc.text, "thinking": doc.thinking or "", "id": doc.id}

    def get_dataset(self, split=SPLIT, shuffle=False, seed=None, shard_info=None, *, sequence_length=None,
                    use_cached=False, num_epochs=1):  # fmt: skip
        files = self.list_shards(split)
        if shard_info is not None:
            files = files[shard_info.index :: shard_info.num_shards]
        dataset = tf.data.Dataset.from_generator(
            lambda: self.documents(files), output_signature=self.output_features
        )
        return dataset.repeat(num_epochs) if num_epochs != 1 else dataset


def template_parts(template: str) -> list[str]:
    """A join template split into literals and field names: "{text}\\n<think>..." ->
    ["{text}", "\\n<think>\\n", "{thinking}", ...]."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = fields - {"text", "thinking"}
    if unknown:
        raise ValueError(
            f"data.tpt_template may only use {{text}} and {{thinking}}, not {sorted(unknown)}"
        )
    return [p for p in re.split(r"(\{text\}|\{thinking\})", template) if p]


def join_preprocessor(template: str | None):
    """A seqio preprocessor producing the `targets` text: the document, or the TPT join."""
    parts = template_parts(template) if template else ["{text}"]

    def join(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def fn(ex):
            pieces = [
                ex[p[1:-1]] if p in ("{text}", "{thinking}") else tf.constant(p) for p in parts
            ]
            # The document travels along so that prepare can count the thinking tokens, and
            # its id so that prepare can hold it out.
            return {"targets": tf.strings.join(pieces), "document": ex["text"], "id": ex["id"]}

        return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

    return join


def make_task(name: str, corpus: CorpusConfig, tpt: bool, template: str, sp_vocab) -> seqio.Task:
    return seqio.Task(
        name,
        source=CorpusSource(corpus, need_thinking=tpt),
        output_features={"targets": seqio.Feature(sp_vocab, add_eos=True, dtype=tf.int32)},
        preprocessors=[
            join_preprocessor(template if tpt else None),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos,
        ],
    )


def private_task(data: DataConfig, task_name: str) -> seqio.Task:
    """A task of the data config built for one caller, not taken from seqio's process-wide
    registry: prepare's work items set their own reject log on its source, and work items running
    on threads of one worker must not share (and swap) one source object."""
    for corpus in data.corpora:
        for suffix, tpt in (("vanilla", False), ("tpt", True)):
            if task_name == f"{corpus.name}_{suffix}" and (corpus.thinking_field or not tpt):
                sp_vocab = vocab.seqio_vocabulary(data.vocab_path)
                return make_task(task_name, corpus, tpt, data.tpt_template, sp_vocab)
    raise KeyError(task_name)


def register(
    data: DataConfig, mixture_name: str = "tpt_mixture"
) -> tuple[list[seqio.Task], seqio.Mixture | None]:
    """(Re)registers every corpus's tasks and the configured mixture in seqio's registries."""
    sp_vocab = vocab.seqio_vocabulary(data.vocab_path)
    tasks = []
    for corpus in data.corpora:
        kinds = [("vanilla", False)] + ([("tpt", True)] if corpus.thinking_field else [])
        for suffix, tpt in kinds:
            name = f"{corpus.name}_{suffix}"
            seqio.TaskRegistry.remove(name)
            task = make_task(name, corpus, tpt, data.tpt_template, sp_vocab)
            seqio.TaskRegistry.add_provider(name, task)
            tasks.append(task)
    mixture = None
    if data.mixture:
        seqio.MixtureRegistry.remove(mixture_name)
        mixture = seqio.Mixture(mixture_name, [(m.task, m.rate) for m in data.mixture])
        seqio.MixtureRegistry.add_provider(mixture_name, mixture)
    return tasks, mixture
