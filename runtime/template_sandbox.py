"""The sandbox a bundle's chat template runs in: it sees plain data only, reaches the attributes and methods of
plain data only, and works within a budget of time and size.

Budget: every loop iteration, call and attribute lookup checks the render's deadline; every call, filter and
`*`, `**`, `%` is refused when its result would exceed the size bound (checked before the operations that can
blow up a small input: padding widths, repetition, powers, replacement), and the output is counted as it is
produced. A template over budget raises `InputError`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace
from markupsafe import Markup

from .errors import InputError

MAX_CHARS = 1 << 20  # the default bound of a render's output and of any value it builds, in characters
MAX_SECONDS = 5.0  # the default bound of a render's time
MAX_DEPTH = 32
_SCALARS = {str: str.__str__, bool: bool, int: int.__int__, float: float.__float__}  # exact copies of subclasses
# What a template may read attributes of and call methods on: plain data and Jinja's own helpers.
_TEMPLATE_TYPES = (str, int, float, bool, type(None), dict, list, tuple, Markup, LoopContext, Namespace, Cycler, Joiner)
_BUDGETED = "__budgeted"  # the filter wrapped around every for loop's iterable
_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d+))?")
_BRACE_NUMBER = re.compile(r"\{[^{}]*?(\d+)[^{}]*\}")


def plain(value: Any, depth: int = 0) -> Any:
    """A copy of `value` made of dicts, lists, strings, numbers, booleans and None only: paths become strings and
    any other object (a PIL image, a numpy array) the placeholder string `<TypeName>`."""
    if depth > MAX_DEPTH:
        raise InputError(f"messages nest deeper than {MAX_DEPTH} levels")
    if value is None:
        return None
    for kind, copy in _SCALARS.items():
        if isinstance(value, kind):
            return copy(value)
    if isinstance(value, dict):
        return {
            plain(key, depth + 1) if isinstance(key, tuple(_SCALARS)) else f"<{type(key).__name__}>": plain(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [plain(item, depth + 1) for item in value]
    if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
        return os.fspath(value)
    return f"<{type(value).__name__}>"


class Budget:
    """One render's limits: a deadline (`time.monotonic`) and a size bound in characters (or items)."""

    def __init__(self, max_chars: int, max_seconds: float):
        self.max_chars, self.max_seconds = max_chars, max_seconds
        self.deadline = time.monotonic() + max_seconds

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise InputError(f"the chat template took longer than {self.max_seconds:g} s to render")

    def check_size(self, size: int) -> None:
        if size > self.max_chars:
            raise InputError(f"the chat template builds a value of more than {self.max_chars} characters")


# Outside a render (Jinja folds constant filter calls while compiling) the size bound holds, without a deadline.
_budget: ContextVar[Budget] = ContextVar("chat_template_budget", default=Budget(MAX_CHARS, math.inf))


@contextmanager
def render_budget(max_chars: int, max_seconds: float) -> Iterator[Budget]:
    """The budget of the template code run in this block (each thread and context has its own)."""
    token = _budget.set(Budget(max_chars, max_seconds))
    try:
        yield _budget.get()
    finally:
        _budget.reset(token)


def _check_time() -> None:
    _budget.get().check_time()


def _check_size(size: int) -> None:
    _budget.get().check_size(size)


def _check_result(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _check_size(len(value))
    return value


def _check_arguments(args: tuple, kwargs: dict) -> None:
    """Integer arguments (padding widths, batch sizes) beyond the size bound are refused before the call."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int):
            _check_size(value)


def _check_format(template: Any) -> None:
    """Field widths and precisions of a `%` or `{}` format string beyond the size bound are refused."""
    if isinstance(template, str):
        numbers = [n for spec in _PERCENT_SPEC.findall(template) for n in spec if n]
        for number in numbers + _BRACE_NUMBER.findall(template):
            _check_size(int(number))


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        _check_size(len(text) + text.count(old) * (len(new) - len(old)))


def _budgeted(iterable):
    for item in iterable:
        _check_time()
        yield item


def _bounded_filter(name: str, function):
    """A filter checked like a call: arguments before, result after (`format` and `replace` looked into)."""

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        _check_time()
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment))]
        _check_arguments(tuple(values[1:]), kwargs)
        if name == "format" and values:
            _check_format(values[0])
        if name == "replace" and len(values) >= 3:
            _check_replace(*values[:3])
        return _check_result(function(*args, **kwargs))

    return bounded


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        _check_size(abs(base).bit_length() * exponent // 8)
    return base**exponent


def _repeat(left: Any, right: Any) -> Any:
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
            _check_size(len(sequence) * count)
    return left * right


def _percent(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _check_format(left)
        _check_arguments(right if isinstance(right, tuple) else (right,), {})
    return left % right


class TemplateSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox limited to plain data, with every for loop, call, filter and `*`, `**`, `%`
    under the budget of the current `render_budget` block (templates compiled with `compile_budgeted`)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, filters: dict[str, Any], globals: dict[str, Any], **options):
        super().__init__(**options)
        self.binop_table.update({"*": _repeat, "**": _power, "%": _percent})
        self.filters = {name: _bounded_filter(name, function) for name, function in {**self.filters, **filters}.items()}
        self.filters[_BUDGETED] = _budgeted
        self.globals.update(globals)

    def compile_budgeted(self, source: str) -> jinja2.Template:
        """Parse, wrap every for loop's iterable in the budget check, compile."""
        tree = self.parse(source)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _BUDGETED, [], [], None, None, lineno=loop.lineno).set_environment(self)
        return self.from_string(tree)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return isinstance(obj, _TEMPLATE_TYPES) and super().is_safe_attribute(obj, attr, value)

    def is_safe_callable(self, obj: Any) -> bool:
        owner = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)  # str.format comes wrapped by the sandbox
        allowed = (
            isinstance(obj, (Macro, LoopContext, Cycler, Joiner))
            or any(obj is value for value in self.globals.values())
            or isinstance(owner, (*_TEMPLATE_TYPES, jinja2.ext.Extension))
        )
        return allowed and super().is_safe_callable(obj)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_time()
        _check_arguments(args, kwargs)
        name = getattr(__obj, "__name__", None)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str) and name in ("format", "format_map"):
            _check_format(owner)
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            _check_replace(owner, *args[:2])
        return _check_result(super().call(__context, __obj, *args, **kwargs))
