"""A seqio Vocabulary over a `tokenizers` tokenizer.json: prepare data with a base model's own
tokenizer (Qwen, Llama-3) for mid-training, with the model's ids.

`data.vocab_path` names the tokenizer.json; its EOS comes from the tokenizer_config.json beside it
(`eos_token`). No BOS is added, as for the SentencePiece vocabularies; padding never reaches the
model (rows carry segment ids), so pad is id 0 as seqio expects.
"""

from __future__ import annotations

import json
import os

import seqio
import tensorflow as tf
import tokenizers

from tpt_jax.data.vocab import VocabError


class TokenizerJsonVocabulary(seqio.Vocabulary):
    def __init__(self, path: str):
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise VocabError(f"{path}: cannot load tokenizer ({e})") from None
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        eos = None
        if os.path.exists(config_path):
            with open(config_path) as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        self._eos = self._tok.token_to_id(eos) if eos else None
        if self._eos is None:
            raise VocabError(f"{config_path}: no eos_token the tokenizer knows; EOS is needed")
        self.path = path
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self._tok.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _encode_tf(self, s):
        def encode(text):
            return tf.constant(self._encode(text.numpy().decode("utf-8")), tf.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids):
        def decode(values):
            return tf.constant(self._decode(values.numpy().tolist()))

        text = tf.py_function(decode, [ids], tf.string)
        text.set_shape([])
        return text

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenizerJsonVocabulary) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)
