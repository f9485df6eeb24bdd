"""The generator model's own tokenizer (`tokenizer.json`) and chat template (jinja2).

Prompts must match what the generator was trained on: a chat model sees the prompt wrapped in its
chat template with the assistant turn opened (add_generation_prompt), exactly as `transformers`
renders it.
"""

from __future__ import annotations

import json
import os

import jinja2
import jinja2.sandbox
import tokenizers

from tpt_jax import storage
from tpt_jax.errors import TptError


class TokenizerError(TptError):
    """A model folder without a usable tokenizer.json or chat template."""


def _raise(message: str):
    raise TokenizerError(f"chat template: {message}")


class GeneratorTokenizer:
    """tokenizer.json + tokenizer_config.json (chat_template, eos/bos tokens) of a model folder."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")  # local or gs://
        try:
            self._tok = tokenizers.Tokenizer.from_str(_read(path, str))
        except TokenizerError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None
        config = {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if storage.exists(config_path):
            config = _read(config_path, json.loads)
        template, template_path = config.get("chat_template"), config_path
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if template is None and storage.exists(jinja_path):
            template, template_path = _read(jinja_path, str), jinja_path
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None
        if isinstance(template, str):
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(
                    f"{template_path}: the chat template does not parse (line {e.lineno}: "
                    f"{e.message})"
                ) from None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def chat(self, user_message: str, **template_kwargs) -> str:
        """The prompt text of one user turn with the assistant turn opened."""
        if self._template is None:
            raise TokenizerError(
                "this model folder has no chat template; set think.chat_template=false"
            )
        return self._template.render(
            messages=[{"role": "user", "content": user_message}],
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **template_kwargs,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of text as written (special tokens in the text are recognised, none added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def completion(self, tokens: list[int], stops=()) -> tuple[str, bool]:
        """The text of generated tokens up to the first EOS, cut at the first stop string (not
        kept), and whether EOS or a stop string ended it."""
        ended = self.eos_id is not None and self.eos_id in tokens
        if ended:
            tokens = tokens[: tokens.index(self.eos_id)]
        text, cut = cut_at_stop(self.decode(tokens), stops)
        return text, ended or cut

    def truncate(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """The longest prefix of text within max_tokens tokens (cut at a token boundary)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= max_tokens:
            return text, False
        end = encoding.offsets[max_tokens - 1][1]
        return text[:end], True


def _read(path: str, parse):
    try:
        return parse(storage.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise TokenizerError(f"{path}: cannot read it ({e})") from None


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """text up to its first stop string (not kept), and whether one occurred."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older configs
        return value.get("content")
    return value
