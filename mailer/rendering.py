"""Rendering `templates/mailer/<name>/{subject.txt, body.txt, body.html}`.

The text parts render without HTML autoescaping (a name like O'Brien stays as written); the HTML
part escapes as usual. Every template extends `mailer/base.txt` or `mailer/base.html`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.template import Context, Engine, TemplateDoesNotExist, engines
from django.template.base import FilterExpression, NodeList, Variable, VariableNode
from django.template.defaulttags import ForNode, IfNode, WithNode

TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def _engine() -> Engine:
    return engines["django"].engine


def template_exists(name: str) -> bool:
    """Whether `name` is a safe template name with at least a subject and a text body."""
    if not isinstance(name, str) or not TEMPLATE_NAME.fullmatch(name):
        return False
    engine = _engine()
    try:
        engine.get_template(f"mailer/{name}/subject.txt")
        engine.get_template(f"mailer/{name}/body.txt")
    except TemplateDoesNotExist:
        return False
    return True


def render(name: str, context: dict[str, Any]) -> Rendered:
    """The three parts of template `name` (the HTML part is empty when it has no body.html).
    The subject is stripped of surrounding whitespace but not of inner newlines, so a caller can
    refuse a header injection instead of hiding it."""
    engine = _engine()

    def part(filename: str, *, autoescape: bool, optional: bool = False) -> str:
        try:
            template = engine.get_template(f"mailer/{name}/{filename}")
        except TemplateDoesNotExist:
            if optional:
                return ""
            raise
        # A missing base layout still fails loudly: it is only loaded here, at render time.
        return template.render(Context(context, autoescape=autoescape))

    return Rendered(
        subject=part("subject.txt", autoescape=False).strip(),
        text=part("body.txt", autoescape=False).strip() + "\n",
        html=part("body.html", autoescape=True, optional=True).strip(),
    )


#: Filters that give a missing variable a value: what they wrap is optional.
DEFAULTING_FILTERS = frozenset({"default", "default_if_none"})


def required_context(name: str) -> set[str]:
    """The context names template `name` prints unconditionally: each `{{ variable }}` outside any
    `{% if %}`, outside a `{% for %}` or `{% with %}` that defines it, and without a `default`
    filter. A context without one of them would render an empty hole ("Welcome, !"). The base
    layouts (`mailer/base.*`) are not read: what they print, the mailer provides."""
    engine = _engine()
    names: set[str] = set()
    for filename in ("subject.txt", "body.txt", "body.html"):
        try:
            template = engine.get_template(f"mailer/{name}/{filename}")
        except TemplateDoesNotExist:
            continue
        names.update(_printed(template.nodelist, frozenset()))
    return names


def _printed(nodes: NodeList, defined: frozenset[str]) -> Iterator[str]:
    for node in nodes:
        if isinstance(node, VariableNode):
            head = _required_head(node.filter_expression)
            if head is not None and head not in defined and head != "block":  # {{ block.super }}
                yield head
        elif isinstance(node, IfNode):
            continue  # what an {% if %} prints is conditional: never required
        elif isinstance(node, ForNode):
            yield from _printed(node.nodelist_loop, defined | set(node.loopvars) | {"forloop"})
            yield from _printed(node.nodelist_empty, defined)
        elif isinstance(node, WithNode):
            yield from _printed(node.nodelist, defined | set(node.extra_context))
        else:
            for attribute in getattr(node, "child_nodelists", ()):
                inner = getattr(node, attribute, None)
                if isinstance(inner, NodeList):
                    yield from _printed(inner, defined)


def _required_head(expression: FilterExpression) -> str | None:
    variable = expression.var
    if not isinstance(variable, Variable) or variable.lookups is None:
        return None  # a literal
    if any(getattr(func, "__name__", "") in DEFAULTING_FILTERS for func, _args in expression.filters):
        return None
    return str(variable.lookups[0])
