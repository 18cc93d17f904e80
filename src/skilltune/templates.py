"""HTML pages from Jinja templates: the one templating path for every report and the scorecard app.

Templates live in ``skilltune/resources/templates``; autoescaping is on for all of
them, so model outputs, prompts, file names and notes (untrusted text) are always
escaped. Values that are already HTML-safe (a base64 image) are passed as data URLs.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, PackageLoader

    return Environment(loader=PackageLoader("skilltune", "resources/templates"), autoescape=True)


def render(template: str, /, **context) -> str:
    """Render ``template`` (a file name such as ``eval_report.html``) with ``context``."""
    return environment().get_template(template).render(**context)
