"""The sandboxed template engine with a budget: compile checks and bounded renders.

Templates are Jinja2 in ``ImmutableSandboxedEnvironment`` (template authors are not trusted
with Python) with ``StrictUndefined``; only the HTML body is autoescaped, and a subject that
renders with a line break is refused (it would inject headers). This is the configuration
the sender renders with (``sluice.sender.render``); this module adds what a service that
renders on behalf of an API caller needs (promise 8): every render stops with
:class:`RenderBudgetExceeded` once it runs past its time, produces more than its size, or
iterates more than its loop budget, instead of holding a core or the memory.

Checks happen where the work is about to be done: ``range`` counts its items against the
budget, ``*``/``%``/``**`` and the padding filters and string methods refuse results larger
than the budget before building them, ``str.format`` refuses huge field widths, and every
call, attribute access and output chunk checks the clock.
"""

from __future__ import annotations

import functools
import re
import string
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "PARTS",
    "RenderBudget",
    "RenderBudgetExceeded",
    "RenderedPreview",
    "TemplateRenderError",
    "compile_violations",
    "render_bounded",
]

#: The template parts, as (request field, autoescaped).
PARTS: tuple[tuple[str, bool], ...] = (
    ("subject", False),
    ("html_body", True),
    ("text_body", False),
)
_HEADER_BREAKS = ("\r", "\n", "\x00")
_TEMPLATE_FAULTS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    AttributeError,
    RecursionError,
)
_PERCENT_WIDTH = re.compile(r"%[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")
_SPEC_NUMBER = re.compile(r"\d+")
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


class TemplateRenderError(ValueError):
    """The template cannot be rendered with these variables (the template's fault)."""


class RenderBudgetExceeded(TemplateRenderError):
    """A render ran past its time, size or loop budget."""


@dataclass(frozen=True, slots=True)
class RenderBudget:
    """Limits of one render: wall time for all parts, characters per part, loop items."""

    seconds: float = 0.5
    max_chars: int = 1_000_000
    max_iterations: int = 100_000


@dataclass(frozen=True, slots=True)
class RenderedPreview:
    """A rendered message: subject and text as plain text, html escaped."""

    subject: str
    html: str
    text: str


class _Meter:
    """The budget of the render running on this thread."""

    def __init__(self, budget: RenderBudget) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds
        self.iterations = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderBudgetExceeded(f"render took longer than {self.budget.seconds:g} s")

    def size(self, chars: int) -> None:
        if chars > self.budget.max_chars:
            raise RenderBudgetExceeded(
                f"render would produce more than {self.budget.max_chars:,} characters"
            )

    def iterate(self, n: int) -> None:
        self.iterations += n
        if self.iterations > self.budget.max_iterations:
            raise RenderBudgetExceeded(
                f"loops ran more than {self.budget.max_iterations:,} iterations"
            )


_local = threading.local()


def _meter() -> _Meter:
    meter: _Meter | None = getattr(_local, "meter", None)
    if meter is None:  # compile-only use, or a render outside render_bounded
        meter = _Meter(RenderBudget())
        _local.meter = meter
    return meter


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


def _budgeted_range(*args: int) -> Iterator[int]:
    items = range(*args)
    meter = _meter()
    meter.iterate(len(items))
    for i, item in enumerate(items):
        if i % 1024 == 0:
            meter.tick()
        yield item


def _check_percent(fmt: str) -> None:
    for match in _PERCENT_WIDTH.finditer(fmt):
        for group in match.groups():
            if group and group.isdigit():
                _meter().size(int(group))


def _check_format_spec(fmt: str) -> None:
    for _literal, _field, spec, _conversion in string.Formatter().parse(fmt):
        for number in _SPEC_NUMBER.findall(spec or ""):
            _meter().size(int(number))


def _padded_filter(filter_func: Callable[..., Any], width_arg: int) -> Callable[..., Any]:
    def checked(*args: Any, **kwargs: Any) -> Any:
        width = args[width_arg] if len(args) > width_arg else kwargs.get("width", 0)
        if isinstance(width, int):
            _meter().size(width * max(1, str(args[0]).count("\n") + 1))
        return filter_func(*args, **kwargs)

    return checked


def _replace_filter(replace: Callable[..., Any]) -> Callable[..., Any]:
    def checked(eval_ctx: Any, value: Any, old: Any, new: Any, *args: Any) -> Any:
        _meter().size(len(str(value)) * max(1, len(str(new))))
        return replace(eval_ctx, value, old, new, *args)

    checked.jinja_pass_arg = replace.jinja_pass_arg  # type: ignore[attr-defined]
    return checked


def _format_filter(value: str, *args: Any, **kwargs: Any) -> str:
    _check_percent(str(value))
    return str(value) % (kwargs or args)


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "%", "**"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            autoescape=autoescape, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
        )
        self.globals["range"] = _budgeted_range
        self.filters["center"] = _padded_filter(self.filters["center"], 1)
        self.filters["indent"] = _padded_filter(self.filters["indent"], 1)
        self.filters["format"] = _format_filter
        self.filters["replace"] = _replace_filter(self.filters["replace"])

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        meter = _meter()
        meter.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _length(seq) and isinstance(n, int):
                    meter.size(_length(seq) * n)
        elif operator == "%" and isinstance(left, str):
            _check_percent(left)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            # the digits of left ** right, roughly: refuse before computing a huge integer
            meter.size(int(max(1, left.bit_length()) * max(0, right) * 0.302))
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _meter().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _meter().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_spec(str(value.__self__))
        return wrapped

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        meter = _meter()
        meter.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name in _PADDING_METHODS and args and isinstance(args[0], int):
                meter.size(max(args[0], len(owner) * args[0] if name == "expandtabs" else 0))
            elif name == "replace" and len(args) >= 2:
                meter.size(len(owner) * max(1, len(str(args[1]))))
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str | list):
            meter.size(len(result))
        return result


_ENVIRONMENTS = {
    True: _BudgetedEnvironment(autoescape=True),
    False: _BudgetedEnvironment(autoescape=False),
}


@functools.lru_cache(maxsize=512)
def _compiled(autoescape: bool, source: str) -> jinja2.Template:
    # Compiling costs far more than rendering, and a template version never changes, so the
    # same source is compiled once; compiled templates are safe to render from any thread.
    return _ENVIRONMENTS[autoescape].from_string(source)


def compile_violations(parts: Mapping[str, str], variables: Sequence[str]) -> list[tuple[str, str]]:
    """``(field, description)`` for each part that does not compile or that uses a variable
    not in ``variables``; empty when the template is sound."""
    violations: list[tuple[str, str]] = []
    declared = set(variables)
    for field, autoescape in PARTS:
        env = _ENVIRONMENTS[autoescape]
        source = parts.get(field, "")
        try:
            ast = env.parse(source)
            env.compile(ast)
        except jinja2.TemplateSyntaxError as exc:
            violations.append((field, f"syntax error on line {exc.lineno}: {exc.message}"))
            continue
        except _TEMPLATE_FAULTS as exc:
            violations.append((field, f"does not compile: {exc}"))
            continue
        used = meta.find_undeclared_variables(ast) - env.globals.keys()
        for name in sorted(used - declared):
            violations.append((field, f"uses {name!r}, which is not a declared variable"))
    return violations


def render_bounded(
    parts: Mapping[str, str], variables: Mapping[str, str], budget: RenderBudget
) -> RenderedPreview:
    """Renders the three parts within ``budget``; raises :class:`TemplateRenderError` (or
    its :class:`RenderBudgetExceeded`) saying what is wrong. Runs on the calling thread."""
    _local.meter = _Meter(budget)
    try:
        out: list[str] = []
        for field, autoescape in PARTS:
            try:
                template = _compiled(autoescape, parts.get(field, ""))
                chunks: list[str] = []
                total = 0
                for chunk in template.generate(dict(variables)):
                    total += len(chunk)
                    _local.meter.size(total)
                    _local.meter.tick()
                    chunks.append(chunk)
            except RenderBudgetExceeded as exc:
                raise RenderBudgetExceeded(f"{field}: {exc}") from None
            except _TEMPLATE_FAULTS as exc:
                raise TemplateRenderError(f"{field}: {_describe(exc)}") from exc
            out.append("".join(chunks))
    finally:
        _local.meter = None
    subject, html, text = out
    if any(ch in subject for ch in _HEADER_BREAKS):
        raise TemplateRenderError("subject contains a line break or NUL after rendering")
    return RenderedPreview(subject=subject, html=html, text=text)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"syntax error on line {exc.lineno}: {exc.message}"
    if isinstance(exc, jinja2.UndefinedError):
        return f"undefined variable: {exc.message}"
    if isinstance(exc, SecurityError):
        return f"not allowed in templates: {exc}"
    return f"{type(exc).__name__}: {exc}"
