"""Our chat-template renderer against transformers' `apply_chat_template(tokenize=False)`, over
the real templates of Qwen3, DeepSeek-R1-Distill-Qwen and Llama 3.1/3.2 (tests/data/chat_templates,
see its README for where each came from). transformers is a test dependency only; no network."""

from __future__ import annotations

import json
import os

import pytest
import tokenizers

from tpt_jax.config import load_config
from tpt_jax.errors import ConfigError
from tpt_jax.generate import ChatTemplate, ChatTemplateError, GeneratorTokenizer, TokenizerError
from tpt_jax.think.prompts import load_template, render

transformers = pytest.importorskip("transformers")

DATA = os.path.join(os.path.dirname(__file__), "data", "chat_templates")

# The special tokens each model's tokenizer_config.json sets (None: null there).
QWEN3 = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
R1_DISTILL = {
    "bos_token": "<｜begin▁of▁sentence｜>",
    "eos_token": "<｜end▁of▁sentence｜>",
    "pad_token": "<｜end▁of▁sentence｜>",
}
LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
TEMPLATES = {
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", QWEN3),
    "r1_distill_qwen": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", R1_DISTILL),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3),  # strftime_now
}
THINKING = {"qwen3", "r1_distill_qwen"}  # templates that strip <think>...</think> from history
WITH_TOOLS = {"qwen3", "llama3.1", "llama3.2"}  # templates that render `tools` with tojson

NON_ASCII = 'Café «naïve» 東京 — he said "hi" & <b>it\'s</b> </script> 🍎\\n'
SINGLE = [{"role": "user", "content": "How much do three apples cost?"}]
MULTI = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "Two apples cost 4 dollars. One apple?"},
    {
        "role": "assistant",
        "content": "<think>\n4 / 2 = 2.\n</think>\n\nOne apple costs 2 dollars.",
        "tool_calls": None,  # dropped before rendering (Llama's template tests `in message`)
    },
    {"role": "user", "content": "And six apples?"},
]
QUOTES = [{"role": "user", "content": NON_ASCII}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_price",
            "description": "Prix d'un fruit « frais » in €",
            "parameters": {
                "type": "object",
                "properties": {"fruit": {"type": "string", "description": 'e.g. "pomme"'}},
                "required": ["fruit"],
            },
        },
    }
]
TOOL_TURNS = [
    {"role": "user", "content": "Price of a pomme?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_price", "arguments": {"fruit": "é"}}}
        ],
    },
    {"role": "tool", "content": '{"price": "2 €"}'},
]


def _vocab(template: str, special: dict) -> dict[str, int]:
    words = ["[UNK]", *(v for v in special.values() if v)]
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def _hf_tokenizer(template: str, special: dict):
    model = tokenizers.models.WordLevel(_vocab(template, special), unk_token="[UNK]")
    set_tokens = {k: v for k, v in special.items() if v is not None}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), chat_template=template, **set_tokens
    )


def _model_folder(tmp_path, template: str, special: dict, name="gen") -> str:
    """A model folder as `tpt convert from-hf` leaves it: tokenizer.json + tokenizer_config.json."""
    folder = tmp_path / name
    folder.mkdir()
    model = tokenizers.models.WordLevel(_vocab(template, special), unk_token="[UNK]")
    tokenizers.Tokenizer(model).save(str(folder / "tokenizer.json"))
    config = {"chat_template": template, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return str(folder)


@pytest.fixture(params=sorted(TEMPLATES))
def model(request, tmp_path):
    file, special = TEMPLATES[request.param]
    with open(os.path.join(DATA, file), encoding="utf-8") as f:
        template = f.read()
    folder = _model_folder(tmp_path, template, special)
    return request.param, GeneratorTokenizer(folder), _hf_tokenizer(template, special)


def _hf(hf, messages, **kwargs) -> str:
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize(
    "messages", [SINGLE, MULTI, QUOTES], ids=["single", "multi_turn", "non_ascii"]
)
def test_conversations_render_as_transformers_does(model, messages):
    name, ours, hf = model
    expected = _hf(hf, messages)
    assert ours.render_chat(messages) == expected
    if messages is SINGLE:
        assert ours.chat(SINGLE[0]["content"]) == expected
    if messages is MULTI and name in THINKING:
        assert "4 / 2" not in expected  # the template did strip the earlier reasoning


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_enable_thinking(tmp_path, enable_thinking):
    with open(os.path.join(DATA, TEMPLATES["qwen3"][0]), encoding="utf-8") as f:
        template = f.read()
    hf = _hf_tokenizer(template, QWEN3)
    expected = _hf(hf, SINGLE, enable_thinking=enable_thinking)
    folder = _model_folder(tmp_path, template, QWEN3)
    plain = GeneratorTokenizer(folder)
    assert plain.chat(SINGLE[0]["content"], enable_thinking=enable_thinking) == expected
    # The same through the tokenizer's defaults (think.chat_template_kwargs), and a call's own
    # keyword winning over them.
    preset = GeneratorTokenizer(folder, {"enable_thinking": enable_thinking})
    assert preset.chat(SINGLE[0]["content"]) == expected
    flipped = _hf(hf, SINGLE, enable_thinking=not enable_thinking)
    assert preset.chat(SINGLE[0]["content"], enable_thinking=not enable_thinking) == flipped
    assert ("<think>\n\n</think>" in expected) is (not enable_thinking)


def test_tools_render_as_transformers_does(model):
    name, ours, hf = model
    if name not in WITH_TOOLS:
        pytest.skip("this template does not render tools")
    assert ours.render_chat(SINGLE, tools=TOOLS) == _hf(hf, SINGLE, tools=TOOLS)
    assert ours.chat(SINGLE[0]["content"], tools=TOOLS) == _hf(hf, SINGLE, tools=TOOLS)
    expected = _hf(hf, TOOL_TURNS, tools=TOOLS)
    assert "« frais »" in expected  # tojson kept the non-ASCII text
    assert ours.render_chat(TOOL_TURNS, tools=TOOLS) == expected


def test_qwen3_reasoning_content_field_and_llama_extra_variables(tmp_path):
    with open(os.path.join(DATA, TEMPLATES["qwen3"][0]), encoding="utf-8") as f:
        qwen3 = f.read()
    turns = [
        *SINGLE,
        {"role": "assistant", "content": "Six.", "reasoning": "3 x 2 = 6"},  # aliased
    ]
    ours = GeneratorTokenizer(_model_folder(tmp_path, qwen3, QWEN3))
    assert ours.render_chat(turns) == _hf(_hf_tokenizer(qwen3, QWEN3), turns)
    with open(os.path.join(DATA, TEMPLATES["llama3.1"][0]), encoding="utf-8") as f:
        llama = f.read()
    hf = _hf_tokenizer(llama, LLAMA3)
    ours = GeneratorTokenizer(_model_folder(tmp_path, llama, LLAMA3, name="llama"))
    extra = {"date_string": "01 Jan 2025", "builtin_tools": ["brave_search", "code_interpreter"]}
    assert ours.render_chat(SINGLE, **extra) == _hf(hf, SINGLE, **extra)


# Environment features the real templates above may not all reach, each against transformers.
FEATURES = {
    "loop_controls": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.content }}|{% if loop.index >= 2 %}{% break %}{% endif %}{% endfor %}"
    ),
    "tojson_options": (
        "{{ tools | tojson }}\n{{ tools | tojson(indent=2) }}\n"
        "{{ tools[0] | tojson(sort_keys=true, separators=(',', ':')) }}\n"
        "{{ messages[0] | tojson(ensure_ascii=true) }}"
    ),
    "dict_namespace_globals": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }} {{ dict(a=1, b=[2]) | tojson }} {{ dict.fromkeys(['x'], 0) | tojson }}"
        " {{ strftime_now('%Y') }}"
    ),
    "special_tokens_and_kwargs": (
        "{{ bos_token is defined }} {{ eos_token }} {{ pad_token }} {{ unk_token is defined }}"
        " {{ custom }} {{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}"
    ),
    "generation_tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    ),
    "whitespace_control": (
        "{% for m in messages %}\n    {% if m.role %}\n{{ m.role }}:{{ m.content | trim }}\n"
        "    {% endif %}\n{% endfor %}\n"
    ),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_environment_features_match_transformers(tmp_path, feature):
    special = {"bos_token": None, "eos_token": "</s>", "pad_token": "<pad>"}
    template = FEATURES[feature]
    hf = _hf_tokenizer(template, special)
    ours = GeneratorTokenizer(_model_folder(tmp_path, template, special))
    kwargs = {"tools": TOOLS} if "tojson" in feature else {"custom": "é"}
    assert ours.render_chat(MULTI + QUOTES, **kwargs) == _hf(hf, MULTI + QUOTES, **kwargs)


def test_raise_exception_and_sandbox_become_one_error(tmp_path):
    template = "{{ raise_exception('roles must alternate') }}"
    folder = _model_folder(tmp_path, template, QWEN3)
    with pytest.raises(TokenizerError, match="roles must alternate"):
        GeneratorTokenizer(folder).chat("hi")
    with pytest.raises(ChatTemplateError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(SINGLE)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}", where="t.jinja")


def test_named_templates_and_the_jinja_file_win_as_in_transformers(tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(
        str(folder / "tokenizer.json")
    )
    named = [
        {"name": "default", "template": "plain:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    tok = GeneratorTokenizer(str(folder))
    assert tok.chat("x") == "plain:x"
    assert tok.chat("x", tools=TOOLS) == "tools:1"
    (folder / "chat_template.jinja").write_text("file:{{ messages[0].content }}")
    assert GeneratorTokenizer(str(folder)).chat("x") == "file:x"


def test_think_prompt_through_a_qwen3_model_folder_equals_transformers(tmp_path):
    """The prompt `tpt think` builds for a document (prompts.render, then the chat template with
    think.chat_template_kwargs) equals transformers' rendering of the same user message."""
    with open(os.path.join(DATA, TEMPLATES["qwen3"][0]), encoding="utf-8") as f:
        template = f.read()
    folder = _model_folder(tmp_path, template, QWEN3)
    cfg = load_config(
        None, [f"think.model_dir={folder}", "think.chat_template_kwargs.enable_thinking=false"]
    )
    assert cfg.think.chat_template_kwargs == {"enable_thinking": False}
    document = f"Three apples cost six dollars. {NON_ASCII}"
    user_message = render(load_template(cfg.think.template), document)
    prompt = GeneratorTokenizer(cfg.think.model_dir, cfg.think.chat_template_kwargs).chat(
        user_message
    )
    hf = _hf_tokenizer(template, QWEN3)
    expected = _hf(hf, [{"role": "user", "content": user_message}], enable_thinking=False)
    assert prompt == expected
    assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    "override, message",
    [
        ("think.chat_template_kwargs=3", "must be dict, got int 3"),
        ("think.chat_template_kwargs.messages=[]", "chat_template_kwargs.messages': the prompt"),
    ],
)
def test_bad_chat_template_kwargs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
