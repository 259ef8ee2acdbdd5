"""Rendering `templates/mailer/<name>/{subject.txt, body.txt, body.html}`.

The text parts render without HTML autoescaping (a name like O'Brien stays as written); the HTML
part escapes as usual. Every template extends `mailer/base.txt` or `mailer/base.html`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.template import Context, Engine, TemplateDoesNotExist, engines

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
