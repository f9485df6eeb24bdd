"""SentencePiece vocabularies: train one from a corpus sample, load any `.model`, checksum it.

Ids follow seqio's convention: 0 = padding, 1 = EOS, 2 = UNK, no BOS. The think tags are
user-defined symbols by default, so `<think>` and `</think>` are single tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import fsspec

from tpt_jax import storage
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


def is_tokenizer_json(path: str) -> bool:
    """data.vocab_path names a `tokenizers` tokenizer.json (a base model's own) instead of a
    SentencePiece model."""
    return path.endswith(".json")


def piece_count(model: bytes, path: str = "") -> int:
    if is_tokenizer_json(path):
        import tokenizers

        return tokenizers.Tokenizer.from_str(model.decode()).get_vocab_size(with_added_tokens=True)
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def seqio_vocabulary(path: str):
    """The seqio Vocabulary of data.vocab_path: SentencePiece (.model) or tokenizer.json."""
    import seqio

    if is_tokenizer_json(path):
        from tpt_jax.data.hf_vocab import TokenizerJsonVocabulary

        if "://" in path:
            raise VocabError(
                f"{path}: a tokenizer.json vocabulary is read from a local folder (with its "
                "tokenizer_config.json); copy the base model's tokenizer files to every worker"
            )
        return TokenizerJsonVocabulary(path)
    return seqio.SentencePieceVocabulary(pinned_copy(path)[0])


def pinned_copy(path: str) -> tuple[str, str]:
    """(a local file with the model's current bytes, their checksum).

    The file is named by the checksum: seqio caches a loaded model by its path for the life of
    the process, and TF ops need a local path, so a model rewritten in place (`tpt vocab train`
    to the same path) or on gs:// is never tokenized with under a stale copy.
    """
    model = read_model(path)
    digest = checksum(model)
    local = os.path.expanduser(f"~/.cache/tpt_jax/vocab/{digest[7:39]}.model")
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        # A part file of its own: several workers (processes or threads) may pin it at once.
        handle, part = tempfile.mkstemp(dir=os.path.dirname(local), suffix=".part")
        with os.fdopen(handle, "wb") as f:
            f.write(model)
        os.replace(part, local)
    return local, digest


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


def tokenizer_json(model: bytes) -> str:
    """The SentencePiece model as a `tokenizers` tokenizer.json that encodes text to the same ids.

    Same pieces and scores (Unigram) or pieces and merges (BPE), the model's own normalisation table, whitespace handled as
    SentencePiece does (collapsed, stripped, `▁` prepended), user-defined symbols (the think
    tags) cut out as whole pieces wherever they occur, byte fallback. `tpt export` ships it, so
    the engine, `tpt sample` and HF transformers tokenize a trained model's text alike.
    """
    import tokenizers
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    kind, fallback = proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback
    if kind == proto.trainer_spec.UNIGRAM:
        pieces = [(p.piece, p.score) for p in proto.pieces]
        tok = tokenizers.Tokenizer(
            tokenizers.models.Unigram(pieces, unk_id=UNK_ID, byte_fallback=fallback)
        )
    elif kind == proto.trainer_spec.BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        unk = proto.pieces[UNK_ID].piece
        tok = tokenizers.Tokenizer(
            tokenizers.models.BPE(
                vocab,
                _bpe_merges(proto),
                unk_token=unk,
                byte_fallback=fallback,
                fuse_unk=True,
                ignore_merges=True,
            )
        )
    else:
        raise VocabError("tokenizer.json export supports unigram and BPE SentencePiece models")
    spec = proto.normalizer_spec
    steps = (
        [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    )
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if spec.add_dummy_prefix else "never"
    split = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)]
    symbols = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    if symbols:
        pattern = "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True))
        split.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    controls = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tok.add_special_tokens([tokenizers.AddedToken(c, special=True) for c in controls])
    return tok.to_str()


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """The merges of a SentencePiece BPE model, in the order its encoder applies them.

    SentencePiece BPE merges, at each step, the adjacent pair whose joined piece scores highest
    (pieces are stored best first); a `tokenizers` BPE merges the pair of lowest rank. So every
    normal piece that splits into two pieces of the vocabulary gives a merge, ranked by the
    joined piece's position (then the left part's, for pieces with several splits). User-defined
    symbols are no merge's result: the pre-tokenizer cuts them out and the model takes a segment
    that is a whole piece as it is (`ignore_merges`), as SentencePiece matches them whole.
    """
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type != p.NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in index and right in index:
                ranked.append((i, index[left], index[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def with_special_ids(model_cfg):
    """A ModelConfig as our SentencePiece vocabularies describe it (for generation and HF
    export): the vocabulary's EOS ends a sequence, and no BOS is prepended."""
    return dataclasses.replace(model_cfg, eos_token_id=EOS_ID, bos_token_id=-1)


def write_tokenizer_files(model: bytes, folder: str) -> list[str]:
    """tokenizer.json, tokenizer_config.json and the SentencePiece model itself into a model folder."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    files = {
        "tokenizer.json": tokenizer_json(model),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": sp.id_to_piece(EOS_ID),
                "pad_token": sp.id_to_piece(PAD_ID),
                "unk_token": sp.id_to_piece(UNK_ID),
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        ),
    }
    for name, text in files.items():
        storage.write_bytes(os.path.join(folder, name), text.encode())
    storage.write_bytes(os.path.join(folder, "spiece.model"), model)
    return [*files, "spiece.model"]
