"""Chat templates, rendered as transformers renders them, and safe when the template is hostile.

A template ships inside a package, so it may come from a stranger. It renders in jinja2's
ImmutableSandboxedEnvironment with transformers' own helpers (raise_exception, strftime_now, a
non-escaping tojson, loop controls, namespace, trim_blocks/lstrip_blocks), so benign templates
give byte-identical prompts. On top of the sandbox, which stops attribute escapes to Python
internals, the render is bounded: every argument, operator result, namespace value and the
output itself stay within MAX_SIZE characters (or items, or bytes of an integer), and the whole
render within RENDER_SECONDS of wall clock. Any failure is one ChatTemplateError line.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import contextmanager
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SIZE = 1 << 21  # characters of a rendered prompt, far past any context; also items and integer bytes
RENDER_SECONDS = 2.0  # real templates render in milliseconds
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names transformers accepts, standard first


class ChatTemplateError(ValueError):
    """The package's chat template failed to compile or render; the message is one line."""


class _Refused(TemplateError):
    """raise_exception(message) in the template: it refuses these messages."""


class _Stopped(BaseException):
    """A bound was hit. A BaseException, so no `except Exception` inside jinja2 swallows it."""


def _measure(value) -> int:
    """Characters, items and integer bytes inside `value`, counted until past MAX_SIZE."""
    total, stack = 0, [value]
    while stack and total <= MAX_SIZE:
        item = stack.pop()
        total += 1
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 8
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return total


def _bound(size: int) -> None:
    if size > MAX_SIZE:
        raise _Stopped(f"went past {MAX_SIZE:,} characters, items or bytes and was stopped")


def _check_arguments(args, kwargs) -> None:
    """Refuse an oversized argument before the call: `'x'.ljust(10**10)` must not allocate."""
    for value in (*args, *kwargs.values()):
        _bound(abs(value) if isinstance(value, int) else _measure(value))


def _bounded(function):
    """A filter or global that refuses oversized arguments and results."""
    @functools.wraps(function)  # keeps jinja2's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_arguments(args, kwargs)
        result = function(*args, **kwargs)
        _bound(_measure(result))
        return result

    return bounded


def _raise_exception(message):
    raise _Refused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: jinja2's own escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template, without the dict type's own attributes to climb through."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """namespace(...) that refuses underscore names (as transformers does) and oversized values
    (a loop doubling a string through a namespace would otherwise fill the memory)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]  # jinja2's signature trick: `namespace(self=...)` still works
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _Namespace._check(name, value)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name, value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name, value) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the underscore name {name!r}")
        _bound(_measure(value))


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.filters = {name: _bounded(f) for name, f in {**self.filters, "tojson": _tojson}.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_bounded(_strftime_now),
                            dict=_TemplateDict(), namespace=_Namespace)

    def call_binop(self, context, operator, left, right):
        """Refuse a result too big before computing it: `'x' * 10**10`, `10 ** 10 ** 10`."""
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            _bound(left.bit_length() * right // 8)
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            _bound((left.bit_length() + right.bit_length()) // 8)
        elif operator == "*":
            count, sequence = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(count, int):
                _bound(count * _measure(sequence))
        elif operator == "+":
            _bound(_measure(left) + _measure(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        _check_arguments(args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        _bound(_measure(result))
        return result


@contextmanager
def _deadline(seconds: float):
    """Stop the template's own code once `seconds` have passed: a trace on the compiled
    template's frames (named "<template>") checks the clock at each of its lines."""
    end = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > end:
            raise _Stopped(f"ran past {seconds:g} s and was stopped")
        return on_line

    def on_call(frame, event, arg):
        return on_line(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _plain(value):
    """What the template sees is rebuilt from plain JSON types (as transformers does): a caller's
    rich object could carry methods the sandbox does not know are dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy scalars) carry methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


def _message(message: dict) -> dict:
    """As transformers: keys whose value is None dropped, the reasoning copied under every name."""
    if not isinstance(message, dict):
        raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {message!r:.80}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return _plain(message)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class ChatTemplate:
    def __init__(self, source: str, origin: str):
        """`origin` names the template in errors, e.g. "pkg/manifest.yaml: tokenizer.chat_template"."""
        self.origin = origin
        try:
            self.template = _Sandbox().from_string(source)
        except TemplateSyntaxError as error:
            raise ChatTemplateError(f"{origin} has a syntax error at line {error.lineno}: "
                                    f"{_one_line(error.message)}") from None
        except Exception as error:  # e.g. RecursionError on absurd nesting
            raise ChatTemplateError(f"{origin} cannot be compiled: {type(error).__name__}: "
                                    f"{_one_line(error)}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt for `messages`. `variables` are the template's keywords (bos_token,
        enable_thinking, tools, ...); tools and documents are None unless given, as in transformers."""
        context = _plain({"tools": None, "documents": None, **variables})
        context.update(messages=[_message(message) for message in messages],
                       add_generation_prompt=bool(add_generation_prompt))
        pieces, size = [], 0
        try:
            with _deadline(RENDER_SECONDS):
                for piece in self.template.generate(**context):
                    size += len(piece)
                    _bound(size)
                    pieces.append(piece)
        except _Stopped as stop:
            raise ChatTemplateError(f"{self.origin} {stop}") from None
        except _Refused as error:
            raise ChatTemplateError(f"{self.origin} refused the messages: {_one_line(error.message)}") from None
        except SecurityError as error:
            raise ChatTemplateError(f"{self.origin} tried an unsafe operation and was stopped: "
                                    f"{_one_line(error)}") from None
        except Exception as error:
            raise ChatTemplateError(f"{self.origin} failed: {type(error).__name__}: {_one_line(error)}") from None
        return "".join(pieces)
