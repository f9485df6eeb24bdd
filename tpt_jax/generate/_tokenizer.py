"""The generator model's own tokenizer (`tokenizer.json`) and chat template (jinja2).

Prompts must match what the generator was trained on: a chat model sees the prompt wrapped in its
chat template with the assistant turn opened (add_generation_prompt), exactly as `transformers`
renders it (see chat_template.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import tokenizers

from tpt_jax import storage
from tpt_jax.errors import TptError
from tpt_jax.generate._chat_template import SPECIAL_TOKEN_NAMES, ChatTemplate, ChatTemplateError


class TokenizerError(TptError):
    """A model folder without a usable tokenizer.json or chat template."""


class GeneratorTokenizer:
    """tokenizer.json + tokenizer_config.json (chat template, special tokens) of a model folder.

    The chat template is read as transformers reads it: chat_template.jinja when the folder has
    one, else tokenizer_config.json's `chat_template` (a string, or a list of named templates of
    which "default" is used, and "tool_use" when tools are given).

    Args:
        folder: the model folder (local or gs://).
        chat_template_kwargs: extra template variables of every `chat` call (e.g.
            {"enable_thinking": False}); a call's own keyword arguments win.
    """

    def __init__(self, folder: str, chat_template_kwargs: Mapping | None = None):
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
        templates, template_path = config.get("chat_template"), config_path
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if storage.exists(jinja_path):  # transformers: the file wins over the config entry
            templates, template_path = _read(jinja_path, str), jinja_path
        self.special_tokens = _special_tokens(config)
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._templates = _compile(templates, template_path)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def chat(self, user_message: str, *, tools: list[dict] | None = None, **template_kwargs) -> str:
        """The prompt text of one user turn with the assistant turn opened, as transformers'
        `apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
        add_generation_prompt=True, tools=tools, **kwargs)` renders it; kwargs are the
        tokenizer's chat_template_kwargs updated with template_kwargs."""
        return self.render_chat(
            [{"role": "user", "content": user_message}], tools=tools, **template_kwargs
        )

    def render_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs,
    ) -> str:
        """A whole conversation through the chat template (see `chat`)."""
        template = self._pick_template(tools)
        try:
            return template.render(
                messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self.special_tokens,
                **{**self.chat_template_kwargs, **template_kwargs},
            )
        except ChatTemplateError as e:
            raise TokenizerError(str(e)) from None

    def _pick_template(self, tools) -> ChatTemplate:
        if not self._templates:
            raise TokenizerError(
                "this model folder has no chat template; set think.chat_template=false"
            )
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise TokenizerError(
            f"the chat templates are named {sorted(self._templates)}, none of them 'default'"
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


def _special_tokens(config: dict) -> dict[str, str]:
    """The named special tokens transformers hands a template: the standard names that are set,
    and those of a dict `extra_special_tokens` (model-specific names such as image_token)."""
    names = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        names.update({name: _token_text(value) for name, value in extra.items()})
    return {name: text for name, text in names.items() if isinstance(text, str)}


def _compile(templates, path: str) -> dict[str, ChatTemplate]:
    """{name: template}: a lone template is "default"; a list holds {"name", "template"} dicts."""
    if templates is None:
        return {}
    if isinstance(templates, str):
        templates = {"default": templates}
    elif isinstance(templates, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) for t in templates
    ):
        templates = {t["name"]: t.get("template") for t in templates}
    if not isinstance(templates, dict) or not all(isinstance(t, str) for t in templates.values()):
        raise TokenizerError(
            f"{path}: chat_template must be a string or a list of {{name, template}} entries"
        )
    try:
        return {name: ChatTemplate(text, path) for name, text in templates.items()}
    except ChatTemplateError as e:
        raise TokenizerError(str(e)) from None
