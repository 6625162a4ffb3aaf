"""The /ui dashboard's pages through the app (no browser): status, security headers, no
inline script, no data and no key in what the server renders. The browser test
(test_ui_browser.py) drives the same pages against a running server."""
from __future__ import annotations

import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from svdforge.api.ui import CSP, HERE
from svdforge.core.methods import method_names

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["/ui", "/ui/new", "/ui/jobs/job_01abc"]


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_text.append(data)


def parse(html: str) -> Tags:
    t = Tags()
    t.feed(html)
    return t


@pytest.mark.parametrize("path", PAGES)
def test_pages_answer_with_a_strict_csp(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CSP
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert "unsafe" not in csp and "data:" not in csp and "*" not in csp
    assert directives["frame-ancestors"] == "'none'" and directives["connect-src"] == "'self'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("path", PAGES)
def test_pages_have_no_inline_script_or_style(client, path):
    tags = parse(client.get(path).text)
    scripts = [a for t, a in tags.tags if t == "script"]
    assert scripts and all(a.get("src", "").startswith("/ui/static/") for a in scripts)
    assert tags.script_text == []
    for tag, attrs in tags.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)   # no inline handlers
        assert "style" not in attrs, (tag, attrs)                            # style-src 'self' would block it
        for k in ("href", "src", "action"):
            assert not (attrs.get(k) or "").lower().startswith("javascript:")


@pytest.mark.parametrize("path", PAGES)
def test_pages_carry_no_data_and_need_no_key(client, path, tokens, auth):
    """A page is the same with or without a key: the data comes from /v1, fetched by the browser."""
    anonymous = client.get(path).text
    assert client.get(path, headers=auth).text == anonymous
    assert tokens["alice"] not in anonymous
    assert "svdf_" not in anonymous


def test_the_signin_form_never_puts_the_key_in_a_url(client):
    tags = parse(client.get("/ui").text)
    form = next(a for t, a in tags.tags if t == "form" and a.get("id") == "signin-form")
    assert form["method"] == "post"          # a GET fallback would send the key as a query parameter
    key_input = next(a for t, a in tags.tags if t == "input" and a.get("id") == "signin-key")
    assert key_input["type"] == "password" and key_input["autocomplete"] == "off"
    links = [a.get("href") or a.get("src") or a.get("action") or "" for _, a in tags.tags]
    assert not [u for u in links if "?" in u]


def test_no_script_puts_the_key_in_a_url_or_injects_html():
    js = {p.name: p.read_text() for p in (HERE / "static").glob("*.js")}
    assert set(js) == {"common.js", "jobs.js", "new.js", "job.js"}
    for name, text in js.items():
        assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text, name
        assert "document.write" not in text and "eval(" not in text, name
        assert "EventSource" not in text.replace("unlike EventSource", ""), name  # it cannot send the header
    # the key is read in one place and only ever goes into the Authorization header
    assert [n for n, t in js.items() if "sessionStorage" in t] == ["common.js"]
    assert "Authorization: `Bearer ${key}`" in js["common.js"]


def test_the_form_offers_the_schemas_choices(client):
    html = client.get("/ui/new").text
    tags = parse(html)
    options = {a.get("value") for t, a in tags.tags if t == "option"}
    assert set(method_names()) <= options
    assert {"none", "update", "lora", "adalora", "builtin", "file", "hf"} <= options
    names = {a.get("name") for t, a in tags.tags if t in ("input", "select")}
    assert {"model", "ratio", "method", "adapter.type", "calibration.source", "calibration.samples",
            "evaluation.source", "evaluation.max_tokens"} <= names


def test_static_files_carry_the_headers(client):
    for name, kind in (("common.js", "javascript"), ("ui.css", "text/css")):
        r = client.get(f"/ui/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/static/nope.js").status_code == 404


def test_a_malformed_job_id_is_a_problem_not_a_page(client):
    r = client.get("/ui/jobs/%3Cscript%3E")
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["field"] == "job_id"   # JSON, never an HTML page around the id


def test_the_dashboard_is_not_part_of_the_api_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_package_data_ships_every_dashboard_file():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "svdforge.api.ui" in setuptools["packages"]
    globs = setuptools["package-data"]["svdforge.api.ui"]
    shipped = {p for g in globs for p in HERE.glob(g)}
    files = {p for p in HERE.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"}
    assert files and files == shipped


@pytest.mark.parametrize(("env", "outcome"), [({}, pytest.skip.Exception), ({"CI": "true"}, pytest.fail.Exception),
                                              ({"SVDFORGE_REQUIRE_BROWSER": "1"}, pytest.fail.Exception)])
def test_a_missing_browser_skips_only_outside_ci(monkeypatch, tmp_path, env, outcome):
    from . import test_ui_browser

    monkeypatch.setattr(test_ui_browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    for name in ("CI", "SVDFORGE_REQUIRE_BROWSER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(outcome, match="no chromium"):
        test_ui_browser._browser_or_skip()
