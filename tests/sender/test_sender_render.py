"""Template rendering: escaping, strictness, sandboxing, header safety and the cache."""

from __future__ import annotations

import html

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.sender.render import RenderedMessage, Renderer, RenderError, Template, render
from sluice.v1 import sender_pb2


def template(
    subject: str = "Hi {{ name }}",
    html_body: str = "<p>Hello {{ name }}</p>",
    text_body: str = "Hello {{ name }}",
    *,
    id: str = "welcome",
    version: int = 1,
    variables: tuple[str, ...] = ("name",),
) -> Template:
    return Template(id, version, subject, html_body, text_body, variables, "Sluice <a@b.test>")


def test_renders_subject_html_and_text() -> None:
    out = render(template(), {"name": "Ada & <Bob>"})
    assert out == RenderedMessage(
        subject="Hi Ada & <Bob>",
        html="<p>Hello Ada &amp; &lt;Bob&gt;</p>",
        text="Hello Ada & <Bob>",
    )


def test_accepts_the_protobuf_template() -> None:
    content = sender_pb2.TemplateContent(
        id="t", version=3, subject="S {{ x }}", html_body="<b>{{ x }}</b>", text_body="{{ x }}"
    )
    content.variables.append("x")
    assert render(content, {"x": "'q'"}).html == "<b>&#39;q&#39;</b>"
    with pytest.raises(RenderError, match="missing variable"):
        render(content, {})


def test_missing_declared_variable_is_named() -> None:
    with pytest.raises(RenderError, match=r"missing variable\(s\): name"):
        render(template(), {"other": "x"})


def test_undeclared_undefined_variable_is_an_error_not_a_blank() -> None:
    t = template(text_body="Hello {{ name }} {{ surname }}", id="undeclared")
    with pytest.raises(RenderError, match="text_body: undefined variable: 'surname'"):
        render(t, {"name": "Ada"})


def test_syntax_error_is_reported_and_cached() -> None:
    renderer = Renderer()
    t = template(html_body="<p>{% if name %}</p>", id="broken")
    for _ in range(2):
        with pytest.raises(RenderError, match="html_body: syntax error on line 1"):
            renderer.render(t, {"name": "x"})


@pytest.mark.parametrize(
    "body",
    [
        "{{ name.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ '{0.__class__.__mro__}'.format(name) }}",
        "{% set x = [] %}{{ x.append(1) }}",
    ],
)
def test_sandbox_blocks_python_internals(body: str) -> None:
    with pytest.raises(RenderError):
        render(template(text_body=body, id=f"evil-{body}"), {"name": "x"})


def test_subject_header_injection_from_template_is_rejected() -> None:
    t = template(subject="Hi\nBcc: victim@example.com", id="inject-literal")
    with pytest.raises(RenderError, match="subject contains a line break"):
        render(t, {"name": "x"})


def test_cache_is_keyed_by_version_and_checks_content() -> None:
    renderer = Renderer(cache_size=2)
    v1 = template(text_body="one {{ name }}", id="c", version=1)
    v2 = template(text_body="two {{ name }}", id="c", version=2)
    assert renderer.render(v1, {"name": "x"}).text == "one x"
    assert renderer.render(v2, {"name": "x"}).text == "two x"
    # Same (id, version) with new content: recompiled, never served stale.
    edited = template(text_body="edited {{ name }}", id="c", version=2)
    assert renderer.render(edited, {"name": "x"}).text == "edited x"
    for i in range(5):  # the LRU stays bounded
        renderer.render(template(id=f"other{i}"), {"name": "x"})
    assert len(renderer._cache) == 2


def test_runtime_errors_in_template_code_are_render_errors() -> None:
    with pytest.raises(RenderError, match="ZeroDivisionError"):
        render(template(text_body="{{ 1 / 0 }}", id="div0"), {"name": "x"})


@given(value=st.text())
def test_any_variable_is_escaped_in_html_and_verbatim_in_text(value: str) -> None:
    t = template(subject="S", html_body="<p>[{{ name }}]</p>", text_body="[{{ name }}]", id="prop")
    out = render(t, {"name": value})
    assert out.text == f"[{value}]"
    assert out.html.startswith("<p>[")
    assert out.html.endswith("]</p>")
    inner = out.html[4:-5]
    assert not any(ch in inner for ch in "<>\"'")
    assert html.unescape(inner) == value


@given(
    before=st.text(),
    brk=st.sampled_from(["\r", "\n", "\r\n"]),
    after=st.text(),
)
def test_line_breaks_in_subject_values_are_rejected(before: str, brk: str, after: str) -> None:
    t = template(subject="Re: {{ name }}", id="subject-prop")
    with pytest.raises(RenderError, match="subject"):
        render(t, {"name": before + brk + after})


@given(value=st.text().filter(lambda v: not any(c in v for c in "\r\n\x00")))
def test_subject_values_without_breaks_are_verbatim(value: str) -> None:
    assert render(template(subject="Re: {{ name }}", id="subject-ok"), {"name": value}).subject == (
        f"Re: {value}"
    )
