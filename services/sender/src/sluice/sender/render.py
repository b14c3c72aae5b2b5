"""Per-recipient rendering of message templates.

Templates are Jinja2 run in a sandbox (template authors are not trusted with Python), with
``StrictUndefined`` (a missing variable is an error, never a silent blank). Only the HTML
body is autoescaped: the subject and text body are not HTML, and escaping them would show
``&amp;`` to readers. A subject that renders to something with a line break is refused,
since a header value with CR/LF could inject headers.

Budgets: a template is code written by someone we do not fully trust, so what it may cost
is capped. Operators that can build huge values in one step (``'a' * 10**8``, ``x ** y``,
``+`` of long strings) are checked before they run; output is produced piece by piece and
stops at ``max_output_chars``. Time is capped by the caller: ``render_pool.RenderPool``
runs renders in worker processes with a per-message timer, a memory limit and a hard kill,
so no template can hold the event loop.

Compiled templates are cached by (id, version) in a bounded LRU: a batch renders one
template for many recipients, and compiling costs far more than rendering.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Errors a template can raise while rendering; all are the template's fault (permanent),
# whether Jinja's own (undefined, security, syntax) or ordinary ones from template code.
_TEMPLATE_FAULTS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    AttributeError,
    RecursionError,
)
_HEADER_BREAKS = ("\r", "\n", "\x00")
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
_SIZED = (str, bytes, list, tuple)


class RenderError(ValueError):
    """The template cannot be rendered for this message; sending it would never work."""


@dataclass(frozen=True, slots=True)
class Template:
    """A template's content, decoupled from its protobuf form (``sluice.v1.TemplateContent``).

    ``version`` must change whenever the content does; it keys the compiled-template cache.
    """

    id: str
    version: int
    subject: str
    html_body: str
    text_body: str
    variables: tuple[str, ...] = ()
    from_address: str = ""


class TemplateLike(Protocol):
    """What rendering reads from a template: ``Template`` or a ``TemplateContent`` message."""

    @property
    def id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def html_body(self) -> str: ...
    @property
    def text_body(self) -> str: ...
    @property
    def variables(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """One recipient's message: subject and text as plain text, html escaped."""

    subject: str
    html: str
    text: str


@dataclass(frozen=True, slots=True)
class _Compiled:
    sources: tuple[str, str, str]
    # (subject, html, text), or None with the reason when the template does not compile:
    # caching the failure keeps a broken template from being recompiled per message.
    templates: tuple[jinja2.Template, jinja2.Template, jinja2.Template] | None
    error: str = ""
    # Each part's globals as one plain dict: jinja would otherwise copy them out of a
    # ChainMap for every part of every message (a third of the render time).
    globals: tuple[dict[str, Any], ...] = ()


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus size checks on the operators that can allocate without bound.

    Checking sizes before the operation matters: ``'a' * 10**8`` is one C call that
    allocates 100 MB before any output-size check could see it.
    """

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, *, autoescape: bool, max_output_chars: int) -> None:
        super().__init__(
            autoescape=autoescape, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
        )
        self.max_output_chars = max_output_chars

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        cap = self.max_output_chars
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, _SIZED) and isinstance(times, int) and len(seq) * times > cap:
                    raise SecurityError(f"'*' would build more than {cap} characters")
        elif operator == "+":
            sized = isinstance(left, _SIZED) and isinstance(right, _SIZED)
            if sized and len(left) + len(right) > cap:
                raise SecurityError(f"'+' would build more than {cap} characters")
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and abs(left) > 1
            and left.bit_length() * right > cap * 4
        ):
            # A number of more than ~cap digits is as costly as a string of cap characters.
            raise SecurityError(f"'**' would build a number of more than {cap} digits")
        return super().call_binop(context, operator, left, right)


class Renderer:
    """Renders templates with a bounded cache of compiled ones (``cache_size`` entries).

    ``max_output_chars`` caps each message's subject, HTML and text together.
    """

    def __init__(
        self, cache_size: int = 256, max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        if max_output_chars < 1:
            raise ValueError("max_output_chars must be at least 1")
        self._cache_size = cache_size
        self._max_output = max_output_chars
        self._cache: OrderedDict[tuple[str, int], _Compiled] = OrderedDict()
        self._html_env = _BudgetedSandbox(autoescape=True, max_output_chars=max_output_chars)
        self._plain_env = _BudgetedSandbox(autoescape=False, max_output_chars=max_output_chars)

    def render(self, template: TemplateLike, variables: Mapping[str, str]) -> RenderedMessage:
        """Renders one message; raises ``RenderError`` saying what is wrong."""
        missing = [name for name in template.variables if name not in variables]
        if missing:
            raise RenderError(f"missing variable(s): {', '.join(sorted(missing))}")
        compiled = self._compiled(template)
        if compiled.templates is None:
            raise RenderError(compiled.error)
        parts = []
        budget = self._max_output
        for part, tmpl, names in zip(
            ("subject", "html_body", "text_body"), compiled.templates, compiled.globals, strict=True
        ):
            try:
                text = _render_capped(tmpl, {**names, **variables}, budget)
            except _TEMPLATE_FAULTS as exc:
                raise RenderError(f"{part}: {_describe(exc)}") from exc
            except MemoryError as exc:
                # Raised under the worker's memory limit by a C-level allocation the
                # operator checks cannot see (a filter padding to a huge width).
                raise RenderError(f"{part}: exceeds the render memory budget") from exc
            if text is None:
                raise RenderError(f"output exceeds {self._max_output} characters")
            budget -= len(text)
            parts.append(text)
        subject, html, text = parts
        if any(ch in subject for ch in _HEADER_BREAKS):
            raise RenderError("subject contains a line break or NUL after rendering")
        return RenderedMessage(subject=subject, html=html, text=text)

    def _compiled(self, template: TemplateLike) -> _Compiled:
        key = (template.id, template.version)
        sources = (template.subject, template.html_body, template.text_body)
        hit = self._cache.get(key)
        # Comparing sources is cheap next to rendering and protects against a template
        # edited without a version bump: it is recompiled instead of served stale.
        if hit is not None and hit.sources == sources:
            self._cache.move_to_end(key)
            return hit
        compiled = self._compile(sources)
        self._cache[key] = compiled
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _compile(self, sources: tuple[str, str, str]) -> _Compiled:
        subject, html, text = sources
        current = "subject"
        try:
            subject_t = self._plain_env.from_string(subject)
            current = "html_body"
            html_t = self._html_env.from_string(html)
            current = "text_body"
            text_t = self._plain_env.from_string(text)
        except _TEMPLATE_FAULTS as exc:
            return _Compiled(sources, None, f"{current}: {_describe(exc)}")
        parts = (subject_t, html_t, text_t)
        return _Compiled(sources, parts, globals=tuple(dict(t.globals) for t in parts))


def _render_capped(tmpl: jinja2.Template, context: dict[str, Any], budget: int) -> str | None:
    """The rendered text, or None once it would exceed ``budget`` characters: output is
    generated piece by piece, so a loop that prints forever stops at the cap.

    ``context`` already holds the template's globals, so it is handed to the template as
    is (``shared=True``) instead of being merged with them again. Unlike
    ``Template.generate`` this does not rewrite a failure's traceback, which nobody reads:
    the error becomes a one-line ``RenderError``."""
    pieces: list[str] = []
    for piece in tmpl.root_render_func(tmpl.new_context(context, shared=True)):
        budget -= len(piece)
        if budget < 0:
            return None
        pieces.append(piece)
    return "".join(pieces)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"syntax error on line {exc.lineno}: {exc.message}"
    if isinstance(exc, jinja2.UndefinedError):
        return f"undefined variable: {exc.message}"
    if isinstance(exc, SecurityError):
        return f"not allowed in templates: {exc}"
    return f"{type(exc).__name__}: {exc}"


_default_renderer = Renderer()


def render(template: TemplateLike, variables: Mapping[str, str]) -> RenderedMessage:
    """Renders one message with the process-wide renderer; see ``Renderer.render``."""
    return _default_renderer.render(template, variables)
