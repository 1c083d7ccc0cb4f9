"""A Griffe extension for the docs build: Sphinx roles in docstrings become cross-references.

poolkeeper's docstrings name other objects the Sphinx way (:func:`poolkeeper.wrap`,
:class:`~poolkeeper.Registry`, :meth:`Registry.check`), which reads well in an editor and in
``help()``. mkdocstrings renders docstrings as Markdown, where a role would show as literal text;
this turns each one into a link to the object's entry in the API reference, or into plain code
when the object is not documented there (a private helper, another library's class).
"""

# ruff: noqa: INP001 -- loaded by path from mkdocs.yml, not imported as part of a package

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|exc|data|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring as an optional autorefs cross-reference."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002 -- Griffe passes more
        """Rewrite the roles of ``obj``'s docstring once the whole tree is known."""
        if obj.docstring is None or ":" not in obj.docstring.value:
            return

        def link(match: re.Match[str]) -> str:
            target = match["target"]
            shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
            head, _, rest = target.partition(".")
            try:
                identifier = obj.resolve(head) + (f".{rest}" if rest else "")
            except (griffe.NameResolutionError, LookupError):
                identifier = target
            # `optional`: an object the reference does not document shows as plain code, no warning.
            return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'

        obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
