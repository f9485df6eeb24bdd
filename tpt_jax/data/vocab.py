"""SentencePiece vocabularies: train one from a corpus sample, load any `.model`, checksum it.

Ids follow seqio's convention: 0 = padding, 1 = EOS, 2 = UNK, no BOS. The think tags are
user-defined symbols by default, so `<think>` and `</think>` are single tokens.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import fsspec

from tpt_jax.errors import TptError

THINK_TAGS = ("<think>", "</think>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class VocabError(TptError):
    """A vocabulary that is missing, unreadable, or not the one the data was prepared with."""


def read_model(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise VocabError(f"cannot read SentencePiece model {path}: {e}") from None


def checksum(model: bytes) -> str:
    return "sha256:" + hashlib.sha256(model).hexdigest()


def piece_count(model: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def local_copy(path: str) -> str:
    """A local file with the model's bytes (TF ops need a local path; gs:// models are cached)."""
    if "://" not in path:
        if not os.path.exists(path):
            raise VocabError(f"SentencePiece model not found: {path}")
        return path
    model = read_model(path)
    cache = os.path.join(
        os.path.expanduser("~/.cache/tpt_jax/vocab"), checksum(model).split(":")[1] + ".model"
    )
    if not os.path.exists(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".tmp", "wb") as f:
            f.write(model)
        os.replace(cache + ".tmp", cache)
    return cache


def train(
    texts: Iterable[str],
    out_path: str | None,
    vocab_size: int,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = THINK_TAGS,
    max_sentence_length: int = 16384,
) -> str | bytes:
    """Trains a SentencePiece model on `texts`.

    Returns:
        the model's checksum, after writing it to out_path (local or gs://); or, with
        out_path=None, the model's bytes.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            hard_vocab_limit=False,
            character_coverage=0.9995,
            max_sentence_length=max_sentence_length,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise VocabError(f"SentencePiece training failed: {e}") from None
    model = buffer.getvalue()
    return model if out_path is None else write(out_path, model)


def write(out_path: str, model: bytes) -> str:
    """Writes a model (local or gs://); returns its checksum."""
    with fsspec.open(out_path, "wb", auto_mkdir=True) as f:
        f.write(model)
    return checksum(model)
