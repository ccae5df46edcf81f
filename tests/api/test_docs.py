"""The API docs page works offline: Swagger UI and every asset it loads come from the app itself."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app


def test_docs_page_and_its_assets_are_served_by_the_app(tmp_path: Path) -> None:
    c = TestClient(create_app(f"sqlite:///{tmp_path}/none.db"))  # the docs need no store
    r = c.get("/api/v1/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "://" not in html, "the docs page must not load anything from another host"
    refs = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert len(refs) >= 4, refs  # stylesheet, icon, script, OpenAPI document
    kinds = {}
    for ref in refs:
        assert ref.startswith("/api/v1/"), ref
        a = c.get(ref)
        assert a.status_code == 200 and len(a.content) > 0, ref
        kinds[ref.rsplit(".", 1)[-1]] = a
    assert "SwaggerUIBundle" in kinds["js"].text  # the real Swagger UI bundle, not a placeholder
    assert kinds["css"].headers["content-type"].startswith("text/css")
    assert kinds["json"].json()["openapi"].startswith("3.1")  # Swagger UI 5 renders OpenAPI 3.1
    assert '"validatorUrl": null' in html  # Swagger UI's default validator badge would call swagger.io
    assert c.get("/api/v1/docs/oauth2-redirect").status_code == 200
