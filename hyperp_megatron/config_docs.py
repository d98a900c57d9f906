"""The config reference as Markdown, read from the field docstrings in :mod:`hyperp_megatron.config.sections`.

``python -m hyperp_megatron.config_docs`` prints it; the README's "Config reference" section is its output
(a test keeps them in sync).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from hyperp_megatron import config as config_module


def _field_docs(cls) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(
                getattr(following, "value", None), ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split()).replace("|", "\\|")
    return docs


def _rows(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    rows = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            rows += _rows(hints[field.name], key + ".")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()  # type: ignore[misc]
        type_name = str(hints[field.name]).replace("typing.", "").replace("<class '", "").replace("'>", "").replace(" | ", " or ")
        rows.append(f"| `{key}` | {type_name} | `{default!r}` | {docs.get(field.name, '')} |")
    return rows


def markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += _rows(config_module.Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
