"""``GET /docs``: the API reference as one self-contained HTML page (works offline).

FastAPI's own ``/docs`` loads Swagger UI's JavaScript and CSS from a CDN (no
installed package ships those assets here), so it is blank without network
access.  This page is rendered on the server from the same OpenAPI schema
(``/openapi.json``) and references nothing outside itself: one HTML document
with inline CSS, no scripts, served with ``Content-Security-Policy:
default-src 'none'; style-src 'unsafe-inline'``.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.responses import HTMLResponse

__all__ = ["CSP", "docs_response", "render_docs"]

#: The page's Content-Security-Policy: nothing may be loaded from anywhere.
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.1rem;margin-top:2rem;border-top:1px solid #ddd;padding-top:1rem}
code,pre{font-family:ui-monospace,monospace;background:#f4f4f4;border-radius:3px}pre{padding:.6rem;overflow-x:auto}
.m{display:inline-block;min-width:4.5rem;font-weight:600}.get{color:#0a6}.post{color:#06c}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _type_of(schema: dict[str, Any]) -> str:
    """A short type name: ``string``, ``array of number``, ``string | array of string`` ..."""
    if "oneOf" in schema:
        return " | ".join(_type_of(s) for s in schema["oneOf"])
    t = str(schema.get("type", "any"))
    if t == "array":
        return "array of " + _type_of(schema.get("items") or {})
    return t + (f" ({schema['format']})" if schema.get("format") else "") + (
        " one of " + ", ".join(map(str, schema["enum"])) if schema.get("enum") else "")


def _schema_table(schema: dict[str, Any]) -> str:
    """An object schema's properties as a table (field, type, description); anything else as its type."""
    props = schema.get("properties") or {}
    if not props:
        return f"<p><code>{_esc(_type_of(schema))}</code></p>"
    required = set(schema.get("required") or ())
    rows = "".join(f"<tr><td><code>{_esc(name)}</code>{' (required)' if name in required else ''}</td>"
                   f"<td>{_esc(_type_of(sub))}</td><td>{_esc(sub.get('description', ''))}</td></tr>"
                   for name, sub in props.items())
    return f"<table><tr><th>field</th><th>type</th><th>description</th></tr>{rows}</table>"


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    parts = [f'<h2 id="{_esc(op.get("operationId", path))}"><span class="m {method}">{method.upper()}</span> '
             f'<code>{_esc(path)}</code></h2>']
    if op.get("summary"):
        parts.append(f"<p><b>{_esc(op['summary'])}</b></p>")
    if op.get("description"):
        parts.append(f"<pre>{_esc(op['description'])}</pre>")
    params = op.get("parameters") or []
    if params:
        rows = "".join(f"<tr><td><code>{_esc(p.get('name'))}</code></td><td>{_esc(p.get('in'))}</td>"
                       f"<td>{'yes' if p.get('required') else 'no'}</td></tr>" for p in params)
        parts.append(f"<table><tr><th>parameter</th><th>in</th><th>required</th></tr>{rows}</table>")
    body = (op.get("requestBody") or {}).get("content") or {}
    for media, content in body.items():
        parts.append(f"<p>Request body <code>{_esc(media)}</code>:</p>" + _schema_table(content.get("schema") or {}))
    responses = op.get("responses") or {}
    if responses:
        parts.append("<p>Responses: " + ", ".join(f"<code>{_esc(c)}</code> {_esc(r.get('description', ''))}"
                                                 for c, r in responses.items()) + "</p>")
    return "\n".join(parts)


def render_docs(schema: dict[str, Any], extra_html: str = "") -> str:
    """OpenAPI schema (a dict) -> a complete HTML page listing every operation."""
    info = schema.get("info", {})
    title = _esc(info.get("title", "API"))
    ops = []
    toc = []
    for path, item in (schema.get("paths") or {}).items():
        for method, op in item.items():
            if (method.lower() not in ("get", "post", "put", "delete", "patch", "head", "options")
                    or not isinstance(op, dict)):
                continue
            ops.append(_operation(path, method.lower(), op))
            toc.append(f'<li><a href="#{_esc(op.get("operationId", path))}">{_esc(method.upper())} '
                       f'{_esc(path)}</a></li>')
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{title} <small>v{_esc(info.get('version', ''))}</small></h1>"
        f"<p>{_esc(info.get('description', ''))}</p>"
        f'<p>Machine-readable schema: <a href="openapi.json"><code>/openapi.json</code></a> (OpenAPI '
        f"{_esc(schema.get('openapi', ''))}). This page needs no network access.</p>{extra_html}"
        f"<ul>{''.join(toc)}</ul>{''.join(ops)}</body></html>"
    )


def docs_response(schema: dict[str, Any], extra_html: str = "") -> HTMLResponse:
    """The rendered page with a Content-Security-Policy that forbids loading anything."""
    return HTMLResponse(render_docs(schema, extra_html), headers={"Content-Security-Policy": CSP,
                                                                  "X-Content-Type-Options": "nosniff"})
