"""Authentication and authorization of the API (docs/security.md), over real stores and a real JWKS.

Keys live in real SQLite and PostgreSQL stores; JWTs are signed with real RSA keys whose JWKS (and
OpenID Connect discovery document) a real HTTP server on loopback serves. Every operation of the
OpenAPI document is enumerated: a new endpoint without a guard fails here (and ``create_app``
refuses to build it at all).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from fieldmesh.api.app import OPEN_ROUTES, create_app
from fieldmesh.api.auth import Access
from fieldmesh.control.ca import CertificateAuthority
from fieldmesh.core.codec import decode_telemetry
from fieldmesh.core.settings import AccessSettings
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fmtest.drive import commit_readings

NOW = 1_763_812_345_123
AUDIENCE = "fieldmesh-api"
GROUPS = {"plant1": ("p1-*",), "lab": ("lab-7",)}

#: The weakest role each operation needs. A new endpoint must be added here (the test compares this
#: with the OpenAPI document), with its role: nothing is open by accident.
ROLE_OF = {
    ("get", "/api/v1/stats"): "viewer",
    ("get", "/api/v1/devices"): "viewer",
    ("get", "/api/v1/devices/{device_id}"): "viewer",
    ("post", "/api/v1/devices"): "operator",
    ("patch", "/api/v1/devices/{device_id}"): "operator",
    ("delete", "/api/v1/devices/{device_id}"): "admin",
    ("get", "/api/v1/devices/{device_id}/twin"): "viewer",
    ("get", "/api/v1/devices/{device_id}/twin/delta"): "viewer",
    ("patch", "/api/v1/devices/{device_id}/twin/desired"): "operator",
    ("post", "/api/v1/devices/import"): "operator",
    ("get", "/api/v1/telemetry/raw"): "viewer",
    ("get", "/api/v1/telemetry/rollups"): "viewer",
    ("get", "/api/v1/telemetry/series"): "viewer",
    ("get", "/api/v1/fleet/summary"): "viewer",
    ("get", "/api/v1/events/stream"): "viewer",
    ("get", "/api/v1/dlq"): "viewer",
    ("get", "/api/v1/alerts"): "viewer",
    ("get", "/api/v1/alerts/notifications"): "viewer",
    ("get", "/api/v1/alerts/{alert_id}"): "viewer",
    ("post", "/api/v1/alerts/{alert_id}/ack"): "operator",
    ("post", "/api/v1/alerts/{alert_id}/clear"): "operator",
    ("get", "/api/v1/rules"): "viewer",
    ("post", "/api/v1/rules"): "operator",
    ("get", "/api/v1/rules/{name}"): "viewer",
    ("delete", "/api/v1/rules/{name}"): "operator",  # before the PUT that makes the rule: 404 then
    ("put", "/api/v1/rules/{name}"): "operator",
    ("get", "/api/v1/whoami"): "viewer",
    ("get", "/api/v1/features/{entity}"): "viewer",  # of every device: an entity may span devices
    ("get", "/api/v1/features/similar"): "viewer",  # windows across the fleet
    # jobs and rollouts (docs/rollouts.md): they may reach any device, so every device's role
    ("get", "/api/v1/jobs"): "viewer",
    ("post", "/api/v1/jobs"): "operator",
    ("get", "/api/v1/jobs/{job_id}"): "viewer",
    ("get", "/api/v1/jobs/{job_id}/executions"): "viewer",
    ("post", "/api/v1/jobs/{job_id}/cancel"): "operator",
    ("get", "/api/v1/rollouts"): "viewer",
    ("post", "/api/v1/rollouts"): "operator",
    ("get", "/api/v1/rollouts/{rollout_id}"): "viewer",
    ("post", "/api/v1/rollouts/{rollout_id}/cancel"): "operator",
    # data products and lineage (docs/products.md, docs/lineage.md): sums over many devices
    ("get", "/api/v1/products"): "viewer",
    ("post", "/api/v1/products"): "operator",
    ("get", "/api/v1/products/{name}"): "viewer",
    ("put", "/api/v1/products/{name}"): "operator",
    ("delete", "/api/v1/products/{name}"): "operator",
    ("get", "/api/v1/products/{name}/quality"): "viewer",
    ("get", "/api/v1/products/{name}/compare"): "viewer",
    # canary routing (docs/canary.md): a canary spans many devices
    ("get", "/api/v1/canaries"): "viewer",
    ("post", "/api/v1/canaries"): "operator",
    ("get", "/api/v1/canaries/{name}"): "viewer",
    ("get", "/api/v1/canaries/{name}/readings"): "viewer",
    ("get", "/api/v1/canaries/{name}/compare"): "viewer",
    ("post", "/api/v1/canaries/{name}/promote"): "operator",
    ("post", "/api/v1/canaries/{name}/abort"): "operator",
    ("delete", "/api/v1/canaries/{name}"): "operator",
    ("get", "/api/v1/lineage"): "viewer",
    ("get", "/api/v1/lineage/events"): "viewer",
    ("get", "/api/v1/keys"): "admin",
    ("post", "/api/v1/keys"): "admin",
    ("delete", "/api/v1/keys/{key_id}"): "admin",
    ("get", "/api/v1/audit"): "admin",
    ("get", "/metrics"): "viewer",
    ("post", "/api/v1/provision"): "device",  # the proof is in the body: tests/api/test_provision.py
    ("post", "/api/v1/provision/tokens"): "admin",
    ("post", "/api/v1/ca/revoke"): "admin",
    # the schema registry (docs/schemas.md): reads viewer, changes operator, global settings admin
    ("get", "/api/v1/registry/schemas/types"): "viewer",
    ("get", "/api/v1/registry/schemas/ids/{schema_id}"): "viewer",
    ("get", "/api/v1/registry/schemas/ids/{schema_id}/schema"): "viewer",
    ("get", "/api/v1/registry/schemas/ids/{schema_id}/subjects"): "viewer",
    ("get", "/api/v1/registry/schemas/ids/{schema_id}/versions"): "viewer",
    ("get", "/api/v1/registry/subjects"): "viewer",
    ("post", "/api/v1/registry/subjects/{subject}"): "viewer",
    ("delete", "/api/v1/registry/subjects/{subject}"): "operator",
    ("get", "/api/v1/registry/subjects/{subject}/versions"): "viewer",
    ("post", "/api/v1/registry/subjects/{subject}/versions"): "operator",
    ("get", "/api/v1/registry/subjects/{subject}/versions/{version}"): "viewer",
    ("get", "/api/v1/registry/subjects/{subject}/versions/{version}/schema"): "viewer",
    ("get", "/api/v1/registry/subjects/{subject}/versions/{version}/referencedby"): "viewer",
    ("delete", "/api/v1/registry/subjects/{subject}/versions/{version}"): "operator",
    ("get", "/api/v1/registry/subjects/{subject}/metadata"): "viewer",
    ("post", "/api/v1/registry/compatibility/subjects/{subject}/versions/{version}"): "viewer",
    ("post", "/api/v1/registry/compatibility/subjects/{subject}/versions"): "viewer",
    ("get", "/api/v1/registry/config"): "viewer",
    ("put", "/api/v1/registry/config"): "admin",
    ("delete", "/api/v1/registry/config"): "admin",
    ("get", "/api/v1/registry/config/{subject}"): "viewer",
    ("put", "/api/v1/registry/config/{subject}"): "operator",
    ("delete", "/api/v1/registry/config/{subject}"): "operator",
    ("get", "/api/v1/registry/mode"): "viewer",
    ("put", "/api/v1/registry/mode"): "admin",
    ("delete", "/api/v1/registry/mode"): "admin",
    ("get", "/api/v1/registry/mode/{subject}"): "viewer",
    ("put", "/api/v1/registry/mode/{subject}"): "operator",
    ("delete", "/api/v1/registry/mode/{subject}"): "operator",
    ("get", "/api/v1/registry/contexts"): "viewer",
}
BELOW = {"operator": "viewer", "admin": "operator"}


class Issuer:
    """An OpenID Connect issuer on loopback: discovery document and JWKS, keys rotated at will."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.jwks_hits = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.removeprefix("/realms/plant")  # the issuer's path, as Keycloak's realms
                if path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif path == "/jwks":
                    issuer.jwks_hits += 1
                    body = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())),
                                      "kid": kid, "use": "sig", "alg": "RS256"} for kid, k in issuer.keys.items()]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/realms/plant"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_key(self) -> str:
        kid = secrets.token_hex(4)
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return kid

    def token(self, kid: str, *, key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    i = Issuer()
    yield i
    i.server.shutdown()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    w = load_store(url)
    for dev in ("p1-a", "p2-b", "lab-7"):
        body = b"[" + b",".join(b'{"ts":%d,"seq":%d,"measurements":{"t":%d}}' % (NOW - 60_000 + i * 1000, i, i)
                                for i in range(10)) + b"]"
        rs = decode_telemetry(body, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=NOW).readings
        commit_readings(w, rs)
    w.close()
    return url


def _settings(issuer: Issuer, **kw: Any) -> AccessSettings:
    return AccessSettings(**{"oidc_issuer": issuer.url, "oidc_audience": AUDIENCE, "groups": GROUPS,
                             "jwks_refresh_min_s": 0, **kw})


def _request(c: TestClient, method: str, path: str, token: str | None = None, *, header: str = "bearer") -> Any:
    # deletes name a subject nothing creates, so a repeated delete answers as the first did
    subject = "s-absent" if method == "delete" else "s-auth"
    url = (path.replace("{device_id}", "p1-a").replace("{key_id}", "0123456789ab").replace("{subject}", subject)
           .replace("{version}", "1").replace("{schema_id}", "1").replace("{alert_id}", "4242")
           .replace("{name}", "hot").replace("{entity}", "p1-a?views=pump_stats")
           .replace("{job_id}", "j-absent").replace("{rollout_id}", "r-absent"))
    if path.endswith("/compare"):
        url += "?control=cold"
    if path == "/api/v1/features/similar":
        url += "?view=pump_stats&entity=p1-a"
    url += {"/api/v1/telemetry/series": "?device_id=p1-a&metric=temperature",
            "/api/v1/events/stream": "?topics=stats,alerts,device:p1-a&ticks=1"}.get(path, "")
    headers = {}
    if token is not None:
        headers = {"Authorization": f"Bearer {token}"} if header == "bearer" else {"X-API-Key": token}
    if path == "/api/v1/devices/import":
        return c.post(url, headers={**headers, "Content-Type": "text/csv"}, content=b"device_id,groups\nimp-1,g\n")
    body: Any = {
        ("post", "/api/v1/keys"): {"role": "viewer"},
        ("post", "/api/v1/devices"): {"device_id": f"new-{secrets.token_hex(4)}"},  # a new one each time: 201
        ("patch", "/api/v1/devices/{device_id}"): {"tags": ["t"]},  # p1-a is seen, not registered: 404
        ("patch", "/api/v1/devices/{device_id}/twin/desired"): {"desired": {"mode": "raw"}},
        ("post", "/api/v1/rules"): {"name": f"r-{secrets.token_hex(4)}", "kind": "absence", "after_s": 60},
        ("put", "/api/v1/rules/{name}"): {"kind": "absence", "after_s": 60},
        ("post", "/api/v1/provision/tokens"): {"device_id": "p1-a"},
        ("post", "/api/v1/ca/revoke"): {"serial": "0123456789abcdef"},  # no such certificate: 404
        ("post", "/api/v1/jobs"): {"document": {"op": "report"}, "targets": {"devices": ["p1-a"]}},
        # a manifest whose signature no trusted key made: 400, after the role was checked
        ("post", "/api/v1/rollouts"): {"rollout_id": "r1", "artifact": {"kind": "model"},
                                       "targets": {"devices": ["p1-a"]}},
        ("post", "/api/v1/products"): {"name": f"p-{secrets.token_hex(4)}", "owner": "ops"},  # a new one: 201
        ("put", "/api/v1/products/{name}"): {"name": "hot", "owner": "ops"},  # no product 'hot': 404
        ("post", "/api/v1/canaries"): {"name": f"c-{secrets.token_hex(4)}", "product": "hot"},  # no product: 404
    }.get((method, path))
    if path.startswith("/api/v1/registry/") and method in ("post", "put"):
        body = {"/config": {"compatibility": "BACKWARD"}, "/mode": {"mode": "READWRITE"}}.get(
            path.removeprefix("/api/v1/registry").split("/{")[0], {"schema": '"string"'})
    return c.request(method.upper(), url, headers=headers, json=body)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    """``app(url, access)``: a test client of the API; its key table and store are closed at the end
    (PostgreSQL connections are a shared budget)."""
    made: list[Any] = []

    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)

    def make(url: str, access: Access | None = None) -> TestClient:
        access = access or Access(url)
        store = load_store(url, readonly=True)  # a reader connection per request thread: closed below
        api = create_app(url, access=access, store=store, ca_dir=ca_dir)
        made.extend((access, store, api.state.provision, api.state.twins))
        return TestClient(api)

    yield make
    for a in made:
        a.close()


@pytest.fixture
def keys(store_url: str) -> Iterator[tuple[AccessStore, dict[str, str]]]:
    store = AccessStore(store_url)
    made = {role: store.create_key(role=role, actor="test")[1] for role in ("viewer", "operator", "admin")}
    made["plant1"] = store.create_key(role="viewer", groups=["plant1"], actor="test")[1]
    yield store, made
    store.close()


def test_every_operation_needs_a_credential_and_its_role(app: Any, store_url: str, keys: Any, issuer: Issuer) -> None:
    kid = issuer.add_key()
    _, made = keys
    c = app(store_url, Access(store_url, _settings(issuer)))
    doc = c.get("/api/v1/openapi.json").json()
    ops = {(m, p) for p, ms in doc["paths"].items() for m in ms if p not in OPEN_ROUTES}
    assert ops == set(ROLE_OF), "a new endpoint: add it to ROLE_OF with the role it needs"
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "bearerFormat": "API key (fmk_...) or JWT",
                                 "description": schemes["bearer"]["description"]}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert schemes["oidc"] == {"type": "openIdConnect",
                               "openIdConnectUrl": f"{issuer.url}/.well-known/openid-configuration"}
    no_role = issuer.token(kid)  # valid signature, issuer, audience: but no fieldmesh role
    for (method, path), role in ROLE_OF.items():
        op = doc["paths"][path][method]
        if role == "device":  # no API key, no role: the body's proof, and nothing else, lets it in
            assert "security" not in op and op["x-fieldmesh-auth"] == "device", path
            assert {"400", "401", "403"} <= set(op["responses"]), path
            for token in (None, made["admin"], issuer.token(kid, fieldmesh_role="admin")):
                r = c.post(path, json={"csr": "x"}, headers={"Authorization": f"Bearer {token}"} if token else {})
                assert r.status_code == 401 and r.json()["reason"] == "no_credential", (path, r.text)
            continue
        assert {"bearer": []} in op["security"] and {"oidc": []} in op["security"], path
        assert {"401", "403"} <= set(op["responses"]), path
        r = _request(c, method, path)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="fieldmesh"'), path
        bad = _request(c, method, path, "fmk_0123456789ab_" + "x" * 43)
        assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["WWW-Authenticate"], path
        assert _request(c, method, path, no_role).status_code == 403, path
        if role in BELOW:
            r = _request(c, method, path, made[BELOW[role]], header="x-api-key")
            assert r.status_code == 403 and role in r.json()["detail"], (path, r.text)
        ok = _request(c, method, path, made[role], header="x-api-key")
        allowed = (200, 201, 404, 501) if (method, path) != ("post", "/api/v1/rollouts") else (400,)
        assert ok.status_code in allowed, (method, path, ok.text)  # 404: key 0123456789ab
        jwt_ok = _request(c, method, path, issuer.token(kid, fieldmesh_role=[role, "unrelated"]))
        assert jwt_ok.status_code == ok.status_code, (method, path, jwt_ok.text)


def test_a_key_limited_to_groups_sees_only_their_devices(app: Any, store_url: str, keys: Any, issuer: Issuer) -> None:
    _, made = keys
    c = app(store_url, Access(store_url, _settings(issuer)))
    h = {"Authorization": f"Bearer {made['plant1']}"}
    assert [d["device_id"] for d in c.get("/api/v1/devices", headers=h).json()] == ["p1-a"]
    assert c.get("/api/v1/devices/p1-a", headers=h).json()["readings"] == 10
    for path, params in (("/api/v1/devices/p2-b", {}), ("/api/v1/telemetry/raw", {"device_id": "p2-b"}),
                         ("/api/v1/telemetry/rollups", {"device_id": "lab-7"}),
                         ("/api/v1/alerts", {"device_id": "p2-b"})):
        r = c.get(path, params=params, headers=h)
        assert r.status_code == 404 and "no device" in r.json()["detail"], (path, r.text)
    assert len(c.get("/api/v1/telemetry/raw", params={"device_id": "p1-a"}, headers=h).json()) == 10
    # answers over every device: refused rather than filtered
    for path in ("/api/v1/telemetry/raw", "/api/v1/stats", "/api/v1/dlq", "/metrics",
                 "/api/v1/features/p1-a?views=pump_stats"):
        r = c.get(path, headers=h)
        assert r.status_code == 403 and "plant1" in r.json()["detail"], (path, r.text)
    # a JWT's groups claim limits it the same way; two groups, two devices
    kid = issuer.add_key()
    tok = issuer.token(kid, fieldmesh_role="viewer", fieldmesh_groups=["plant1", "lab"])
    devs = c.get("/api/v1/devices", headers={"Authorization": f"Bearer {tok}"}).json()
    assert sorted(d["device_id"] for d in devs) == ["lab-7", "p1-a"]
    # an unlimited viewer sees all three
    assert len(c.get("/api/v1/devices", headers={"X-API-Key": made["viewer"]}).json()) == 3


def test_keys_revoked_through_the_api_are_refused_at_once_and_audited(app: Any, store_url: str, keys: Any) -> None:
    store, made = keys
    c = app(store_url, Access(store_url, AccessSettings()))
    admin = {"Authorization": f"Bearer {made['admin']}"}
    admin_id = made["admin"].split("_")[1]
    new = c.post("/api/v1/keys", headers=admin, json={"role": "operator", "groups": ["lab"], "name": "ci"})
    assert new.status_code == 201, new.text
    body = new.json()
    assert body["key"].startswith(f"fmk_{body['id']}_") and body["created_by"] == f"key:{admin_id}"
    h = {"X-API-Key": body["key"]}
    assert c.get("/api/v1/whoami", headers=h).json() == {
        "subject": f"key:{body['id']}", "role": "operator", "groups": ["lab"], "local_only": False}
    listed = {k["id"]: k for k in c.get("/api/v1/keys", headers=admin).json()}
    assert "key" not in listed[body["id"]] and listed[body["id"]]["revoked_ms"] is None
    assert c.delete(f"/api/v1/keys/{body['id']}", headers=admin).json()["revoked_by"] == f"key:{admin_id}"
    r = c.get("/api/v1/whoami", headers=h)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # revoked from outside the API (the CLI's path): the next request is refused too
    viewer_id = made["viewer"].split("_")[1]
    assert c.get("/api/v1/stats", headers={"X-API-Key": made["viewer"]}).status_code == 200
    store.revoke_key(viewer_id, actor="cli:ops")
    assert c.get("/api/v1/stats", headers={"X-API-Key": made["viewer"]}).status_code == 401
    # a right id with a wrong secret is refused
    wrong = f"fmk_{admin_id}_" + secrets.token_urlsafe(32)
    assert c.get("/api/v1/stats", headers={"X-API-Key": wrong}).status_code == 401
    assert c.delete("/api/v1/keys/0123456789ab", headers=admin).status_code == 404
    log = c.get("/api/v1/audit", headers=admin).json()
    assert [(e["action"], e["target"], e["actor"]) for e in log[:3]] == [
        ("key.revoke", viewer_id, "cli:ops"), ("key.revoke", body["id"], f"key:{admin_id}"),
        ("key.create", body["id"], f"key:{admin_id}")]
    assert log[2]["detail"] == {"groups": ["lab"], "name": "ci", "role": "operator"}
    assert all(e["at_ms"] > NOW for e in log)
    since = c.get("/api/v1/audit", headers=admin, params={"since": str(log[0]["at_ms"] + 1)}).json()
    assert since == []
    assert c.post("/api/v1/keys", headers=admin, json={"role": "root"}).status_code == 400
    assert c.post("/api/v1/keys", headers=admin, json={"role": "viewer", "groups": ["a/b"]}).status_code == 400


@pytest.mark.parametrize("case", ["expired", "audience", "issuer", "unknown_kid", "hs256", "not_yet", "no_kid"])
def test_bad_jwts_are_refused(app: Any, case: str, tmp_path: Path, issuer: Issuer) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()
    kid = issuer.add_key()
    c = app(url, Access(url, _settings(issuer, jwks_refresh_min_s=3600)))
    good = issuer.token(kid, fieldmesh_role="admin")
    assert c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {good}"}).json()["subject"] == "jwt:alice"
    now = int(time.time())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tok = {
        "expired": lambda: issuer.token(kid, fieldmesh_role="admin", iat=now - 600, exp=now - 120),
        "audience": lambda: issuer.token(kid, fieldmesh_role="admin", aud="another-api"),
        "issuer": lambda: issuer.token(kid, fieldmesh_role="admin", iss="http://127.0.0.1:1/realms/evil"),
        "unknown_kid": lambda: issuer.token("nope", key=stranger, fieldmesh_role="admin"),
        "hs256": lambda: jwt.encode({"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 60,
                                     "fieldmesh_role": "admin"}, "s" * 32, algorithm="HS256",
                                    headers={"kid": kid}),
        "not_yet": lambda: issuer.token(kid, fieldmesh_role="admin", nbf=now + 600),
        "no_kid": lambda: jwt.encode({"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 60},
                                     issuer.keys[kid], algorithm="RS256"),
    }[case]()
    r = c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_the_jwks_is_cached_and_refetched_for_a_new_key(app: Any, tmp_path: Path, issuer: Issuer) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()
    kid = issuer.add_key()
    c = app(url, Access(url, _settings(issuer, jwks_refresh_min_s=0)))
    hits = issuer.jwks_hits
    for _ in range(3):
        tok = issuer.token(kid, fieldmesh_role="viewer")
        assert c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {tok}"}).status_code == 200
    assert issuer.jwks_hits == hits + 1  # fetched once, then cached
    rotated = issuer.add_key()  # the issuer rotates: a token names a kid the cache has not seen
    tok = issuer.token(rotated, fieldmesh_role="viewer")
    assert c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {tok}"}).status_code == 200
    assert issuer.jwks_hits == hits + 2


def test_keycloak_style_roles_claim(app: Any, tmp_path: Path, issuer: Issuer) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()
    kid = issuer.add_key()
    access = Access(url, _settings(issuer, oidc_role_claim="realm_access.roles"))
    c = app(url, access)
    tok = issuer.token(kid, realm_access={"roles": ["offline_access", "operator", "viewer"]})
    assert c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {tok}"}).json()["role"] == "operator"


def test_local_only_mode_until_a_key_exists(app: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()
    c = app(url)  # Access(url), as create_app defaults to: local-only, keys of the same store
    assert c.get("/api/v1/whoami").json() == {"subject": "local", "role": "admin", "groups": None,
                                              "local_only": True}
    assert "store" in c.get("/api/v1/health").json()
    store = AccessStore(url)
    _, secret = store.create_key(role="viewer", actor="test")
    r = c.get("/api/v1/stats")
    assert r.status_code == 401  # the first key ends local-only mode at the next request
    health = c.get("/api/v1/health")
    assert health.status_code == 200 and set(health.json()) == {"status", "version"}  # open to probes, no details
    assert "store" in c.get("/api/v1/health", headers={"X-API-Key": secret}).json()
    store.close()
    # beyond loopback there is no local-only mode, keys or not
    other = f"sqlite:///{tmp_path}/other.db"
    load_store(other).close()
    beyond = app(other, Access(other, local_only=False))
    assert beyond.get("/api/v1/stats").status_code == 401


@pytest.mark.integration
def test_keys_survive_a_lost_postgresql_connection(app: Any, pg_url: str) -> None:
    url = f"{pg_url}?schema=t_{secrets.token_hex(5)}"
    load_store(url).close()
    access = Access(url)
    c = app(url, access)
    _, secret = access.store.create_key(role="viewer", actor="test")
    assert c.get("/api/v1/stats", headers={"X-API-Key": secret}).status_code == 200
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as admin:  # what a server restart does to the connection
        admin.execute("SELECT pg_terminate_backend(%s)", (access.store.backend_pid,))
    assert c.get("/api/v1/stats", headers={"X-API-Key": secret}).status_code == 200
    assert c.get("/api/v1/stats").status_code == 401


def test_http_basic_carries_a_key_or_a_token(app: Any, tmp_path: Path, issuer: Issuer) -> None:
    """How Confluent's schema registry clients send ``basic.auth.user.info`` (docs/schemas.md)."""
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()
    access = Access(url, _settings(issuer))
    c = app(url, access)
    _, key = access.store.create_key(role="operator", actor="test")
    key_id, secret = key.split("_", 2)[1:]
    kid = issuer.add_key()
    for user, password, subject in ((key_id, secret, f"key:{key_id}"), ("key", key, f"key:{key_id}"),
                                    ("anyone", issuer.token(kid, fieldmesh_role="viewer"), "jwt:alice")):
        r = c.get("/api/v1/whoami", auth=(user, password))
        assert r.status_code == 200 and r.json()["subject"] == subject, (user, r.text)
    for user, password in ((key_id, "x" * 43), ("key", "fmk_0123456789ab_" + "x" * 43), ("0123456789ab", secret)):
        r = c.get("/api/v1/whoami", auth=(user, password))
        assert r.status_code == 401, (user, r.text)
