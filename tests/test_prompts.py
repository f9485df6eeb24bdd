"""Prompt templates: built-ins, user files, fields, hashes and the random focus point."""

import pytest

from tpt_jax.think.prompts import FOCUS_MARKER, TemplateError, load_template, render

DOC = "Three apples cost 6 dollars. How much does one cost? Each costs 2 dollars."


def test_default_template_puts_the_document_first():
    t = load_template("default")
    prompt = render(t, DOC)
    assert prompt.startswith(DOC) and "end of the context" in prompt and "Feynman" in prompt
    assert len(t.sha256) == 64 and t.name == "default"


def test_random_focus_marks_a_word_boundary_deterministically():
    t = load_template("random_focus")
    a, b, c = render(t, DOC, seed=1), render(t, DOC, seed=1), render(t, DOC, seed=2)
    assert a == b and FOCUS_MARKER in a
    before = a.split(FOCUS_MARKER)[0]
    assert before == "" or before.endswith(" ")
    assert a.replace(f"{FOCUS_MARKER} ", "", 1).startswith(DOC)
    assert any(render(t, DOC, seed=s) != a for s in range(2, 10)) or c != a


def test_back_thinking_uses_question_and_answer():
    prompt = render(load_template("back_thinking"), question="What is 6 / 3?", answer="2")
    assert "What is 6 / 3?" in prompt and "Final answer:\n2" in prompt


def test_user_template_file_and_errors(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Think about: {document}")
    t = load_template(str(path))
    assert t.name == "mine" and render(t, "x") == "Think about: x"
    path.write_text("{document} {summary}")
    with pytest.raises(TemplateError, match="unknown template fields"):
        load_template(str(path))
    with pytest.raises(TemplateError, match="neither a built-in"):
        load_template("no_such_template")
