"""Prompt templates for thinking generation: files with named fields, recorded by name and hash.

Built in (`tpt_jax/think/templates/`):
  default       the paper's structure in our own words: document, end-of-context line, one
                instruction to simulate an expert's in-depth, Feynman-style thinking.
  random_focus  a random position of the document is marked, and the expert focuses there.
  back_thinking a question and its final answer; the model writes the reasoning between them.
A user template is any text file using the same fields: {document}, {document_with_focus},
{focus_marker}, {question}, {answer}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import string

import numpy as np

from tpt_jax.errors import TptError

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")
FOCUS_MARKER = "<<FOCUS>>"
FIELDS = ("document", "document_with_focus", "focus_marker", "question", "answer")


class TemplateError(TptError):
    """A template that is missing or uses fields we do not fill."""


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def fields(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.text) if f}


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a template file by path."""
    builtin = os.path.join(TEMPLATE_DIR, f"{name_or_path}.txt")
    path = builtin if os.path.exists(builtin) else name_or_path
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        names = sorted(n[:-4] for n in os.listdir(TEMPLATE_DIR) if n.endswith(".txt"))
        raise TemplateError(
            f"template {name_or_path!r} is neither a built-in ({', '.join(names)}) nor a readable file"
        ) from None
    except UnicodeDecodeError as e:
        raise TemplateError(f"template {path} is not UTF-8 text (byte {e.start})") from None
    template = Template(os.path.splitext(os.path.basename(path))[0], text)
    try:
        unknown = template.fields - set(FIELDS)
    except ValueError as e:  # str.format syntax: an unmatched brace
        raise TemplateError(
            f"template {path}: {e}; fields are written {{document}}, a literal brace {{{{ or }}}}"
        ) from None
    if unknown:
        raise TemplateError(
            f"{path}: unknown template fields {sorted(unknown)}; known: {', '.join(FIELDS)}"
        )
    return template


def focus_position(document: str, seed: int) -> int:
    """A random word boundary in the document (deterministic per seed)."""
    starts = [0] + [i + 1 for i, c in enumerate(document) if c.isspace()]
    return starts[int(np.random.default_rng(seed).integers(len(starts)))]


def render(
    template: Template, document: str = "", seed: int = 0, question: str = "", answer: str = ""
) -> str:
    """Fills a template. For back-thinking pass question and answer; otherwise the document."""
    values = {
        "document": document,
        "question": question,
        "answer": answer,
        "focus_marker": FOCUS_MARKER,
    }
    if "document_with_focus" in template.fields:
        at = focus_position(document, seed)
        values["document_with_focus"] = f"{document[:at]}{FOCUS_MARKER} {document[at:]}"
    return template.text.format(**values)


def prefill_length(template: Template, tokenizer, max_document_tokens: int, chat: bool) -> int:
    """Prompt tokens to provision (a power of two): a document of `max_document_tokens` inside
    the template (and the chat template), plus slack for tokens merging across its edges. The
    offline engine and `tpt serve` size their prefill with it."""
    prompt = render(template, "")
    if chat:
        prompt = tokenizer.chat(prompt)
    return 1 << (len(tokenizer.encode(prompt)) + max_document_tokens + 16).bit_length()
