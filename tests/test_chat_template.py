"""Chat templates come with a package, so from a stranger: they render in a sandbox, within time
and size bounds, exactly as transformers renders the benign ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from spac.runtime import cli
from spac.runtime.chat_template import ChatTemplate, ChatTemplateError

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Sort <names> & \"quotes\"."},
            {"role": "assistant", "content": "sorted(names)", "reasoning_content": "easy", "tool_calls": None},
            {"role": "user", "content": "Now reversed."}]
TOOLS = [{"type": "function", "function": {"name": "sort", "description": "Sort <things> & more",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "array"}}}}}]

# Modelled on the real templates of the supported families.
MIXTRAL = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}
{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}
{% endif %}
{% endfor %}
"""
GPT_OSS = """{%- set today = strftime_now("%Y-%m") %}
<|start|>system<|message|>Knowledge cutoff: 2024-06
Current date: {{ today }}<|end|>
{%- for message in messages if message.role != 'system' %}
  {%- if message.role == 'assistant' and message.thinking is defined %}
<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>
  {%- endif %}
<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""
QWEN3 = """{%- if tools %}<|im_start|>system
# Tools
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
{%- if message.role == 'assistant' and loop.index0 > ns.last_user %}{% break %}{% endif %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- if message.tool_calls is defined %}{{ raise_exception('None values reach the template') }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}
"""


def transformers_render(template: str, messages, add_generation_prompt=True, **kwargs) -> str:
    """transformers' own apply_chat_template, on a tokenizer with our special tokens."""
    vocabulary = {"[UNK]": 0, **{token: i + 1 for i, token in enumerate(SPECIAL.values())}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="[UNK]")),
                                        **SPECIAL)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def spac_render(template: str, messages, add_generation_prompt=True, **kwargs) -> str:
    return ChatTemplate(template, "test template").render(messages, add_generation_prompt, **SPECIAL, **kwargs)


@pytest.mark.parametrize("template, messages, kwargs", [
    (MIXTRAL, [m for m in MESSAGES if m["role"] != "system"], {}),
    (GPT_OSS, MESSAGES, {}),
    (QWEN3, MESSAGES, {}),
    (QWEN3, MESSAGES, {"enable_thinking": False, "tools": TOOLS}),
    (QWEN3, MESSAGES[:2], {"enable_thinking": True, "tools": TOOLS}),
], ids=["mixtral", "gpt-oss", "qwen3", "qwen3-no-thinking-tools", "qwen3-thinking"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_does(template, messages, kwargs, add_generation_prompt):
    expected = transformers_render(template, messages, add_generation_prompt, **kwargs)
    assert spac_render(template, messages, add_generation_prompt, **kwargs) == expected
    assert expected  # the comparison is not vacuous


def test_raise_exception_is_one_clear_error():
    with pytest.raises(ChatTemplateError, match="test template refused the messages: Conversation roles must "
                                                "alternate") as error:
        spac_render(MIXTRAL, MESSAGES)  # the system message breaks the alternation
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


HOSTILE = {
    "code": ("{{ cycler.__init__.__globals__.os.system('touch PWNED') }}", "unsafe"),
    "import": ("{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
               "unsafe"),
    "namespace-dunder": ("{% set ns = namespace() %}{% set ns.__class__ = 1 %}", "unsafe"),
    "syntax": ("{% for message in messages %}{{ message.content }", "syntax error at line 1"),
    "refuse": ("{{ raise_exception('System messages are not supported') }}", "refused the messages: System"),
    "huge-range": ("{% for i in range(10**9) %}x{% endfor %}", "characters"),
    "nested-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "ran past"),
    "long-output": ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "characters"),
    "multiply": ("{{ 'x' * 10**10 }}", "characters"),
    "power": ("{{ 2 ** (10 ** 10) }}", "characters"),
    "ljust": ("{{ 'x'.ljust(10**10) }}", "characters"),
    "center-filter": ("{{ 'x' | center(10**10) }}", "characters"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 "characters"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "failed"),
    "type-error": ("{{ 1 + 'a' }}", "failed: TypeError"),
}


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_is_stopped_with_one_line(name, tmp_path, monkeypatch):
    template, message = HOSTILE[name]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError, match=message) as error:
        spac_render(template, MESSAGES)
    assert str(error.value).startswith("test template") and "\n" not in str(error.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def package_with_template(exported, tmp_path_factory):
    """set(template) -> a copy of a package whose manifest carries that chat template."""
    root = Path(shutil.copytree(exported("qwen3_moe").output, tmp_path_factory.mktemp("chat") / "package"))

    def set_template(template: str) -> Path:
        path = root / "manifest.yaml"
        manifest = yaml.safe_load(path.read_text())
        manifest["tokenizer"]["chat_template"] = template
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        return root

    return set_template


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("name", ["code", "syntax", "refuse", "nested-loops", "doubling"])
def test_cli_reports_a_bad_template_as_one_error_line(name, package_with_template, tmp_path, monkeypatch,
                                                      capsys):
    package = package_with_template(HOSTILE[name][0])
    monkeypatch.chdir(tmp_path)
    code = cli.main(["--package", str(package), "--chat", "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spac-run: error: ") and err.count("\n") == 1, err
    assert "manifest.yaml" in err and "tokenizer.chat_template" in err, err
    assert not (tmp_path / "PWNED").exists()


def test_runtime_passes_template_keywords(package_with_template):
    from spac.runtime import Runtime

    with Runtime(package_with_template(QWEN3)) as runtime:
        rendered = runtime.tokenizer.render_chat(MESSAGES[:2], enable_thinking=False, tools=TOOLS)
        assert rendered == transformers_render(QWEN3, MESSAGES[:2], enable_thinking=False, tools=TOOLS)
        assert "<think>" in rendered and "<think>" not in runtime.tokenizer.render_chat(MESSAGES[:2])
        assert not runtime.tokenizer.render_chat(MESSAGES[:2], add_generation_prompt=False).endswith(
            "assistant\n")
