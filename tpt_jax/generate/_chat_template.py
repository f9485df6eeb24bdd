"""Chat templates rendered exactly as `transformers` renders them, without importing it.

Training workers install a slim set of packages, so the generator's chat template (a jinja2
program shipped in tokenizer_config.json or chat_template.jinja) is rendered here. The
environment copies what transformers' `apply_chat_template(..., tokenize=False)` sets up
(transformers 5.x, utils/chat_template_utils.py and tokenization_utils_base.py), because a
template written for it may rely on any of it:

- a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, the loop controls
  `{% break %}` / `{% continue %}`, and the `{% generation %}` tag (it renders its body; it only
  marks assistant tokens for training masks);
- `tojson` that keeps non-ASCII text and does not escape HTML characters (`json.dumps` with
  ensure_ascii=False), taking indent, separators and sort_keys;
- the globals `raise_exception`, `strftime_now` (local time), `dict` and `namespace` (which
  refuses underscore-prefixed names);
- the variables: `messages` (keys whose value is None dropped, reasoning copied under
  `reasoning_content` and `thinking`), `tools`, `documents`, `add_generation_prompt`, the named
  special tokens that are set (`bos_token`, `eos_token`, ...), then any extra keyword argument
  such as `enable_thinking` (an extra argument wins over a special token of the same name).

Example:
    template = ChatTemplate("{{ bos_token }}{{ messages[0].content | tojson }}")
    template.render([{"role": "user", "content": "café"}], special_tokens={"bos_token": "<s>"})
    # '<s>"café"'
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from tpt_jax.errors import TptError

# The named special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# The names a message's reasoning may come under; templates read `reasoning_content` (most) or
# `thinking` (gpt-oss), so both are filled from whichever is given.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(TptError):
    """A chat template that does not parse, or that refused a conversation (raise_exception)."""


class ChatTemplate:
    """One compiled chat template; `render` gives the text `apply_chat_template` would.

    Args:
        source: the jinja2 text of the template.
        where: names the template in error messages (a file path, usually).
    """

    def __init__(self, source: str, where: str = "chat template"):
        self.source = source
        self.where = where
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{where}: the chat template does not parse (line {e.lineno}: {e.message})"
            ) from None

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, str | None] | None = None,
        **template_kwargs,
    ) -> str:
        """The prompt text of `messages` (dicts with "role" and "content").

        tools: JSON schemas of functions (dicts), as the template's `tools`; documents: dicts
        with "title" and "text". special_tokens: token name -> text; unset (None) ones are left
        undefined, as transformers does. template_kwargs: extra template variables
        (`enable_thinking=False`, ...).
        """
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError(f"{self.where}: tools must be JSON schemas (dicts)")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError(f"{self.where}: documents must be dicts (title, text)")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"{self.where}: a message must be a dict, got {message!r}")
            chat.append(_with_reasoning_aliases(_plain(_without_none(message))))
        names = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
        variables = {**names, **_plain(template_kwargs)}
        try:
            return self._template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.where}: {e.message or type(e).__name__}") from None


def _without_none(message: Mapping) -> dict:
    # OpenAI-style messages carry `content=None` / `tool_calls=None`; transformers drops such keys
    # because many templates test `is defined`, not `is none`.
    return {k: v for k, v in message.items() if v is not None}


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value):
    """A copy of value made of JSON-like types only: templates are untrusted code, and must not
    reach methods of richer objects (nor change the caller's messages)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML and always sorts keys; chat templates
    # are written against transformers' plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


class _DictMaker:
    """`dict(...)` in a template: builds plain dicts, exposes no class to climb from."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's `namespace()` refusing underscore-prefixed attributes (no route to internals)."""

    def __init__(*args, **kwargs):  # jinja2's signature: `namespace(self=...)` must still work
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot set the underscore-prefixed attribute {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's tokens for training masks
    in transformers; a prompt renders only its body."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictMaker()
    env.globals["namespace"] = _Namespace
    return env
