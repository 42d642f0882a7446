"""The arXiv client against real recorded API responses, served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest

from arxiv_ft.arxiv_api import ArxivAPIError, ArxivClient, main
from arxiv_ft.records import read_records

FIXTURES = Path(__file__).parent / "fixtures" / "arxiv_api"


class Answer(NamedTuple):
    """A scripted response, given before any fixture lookup (a 503, a slow answer, a chosen feed)."""

    status: int
    body: bytes = b""
    delay_s: float = 0.0


def _key(query: str) -> tuple:
    # Parameter order and percent-encoding differ between clients; the parsed parameters must not.
    return tuple(sorted((k, tuple(v)) for k, v in parse_qs(query, keep_blank_values=True).items()))


def _load(name_prefix: str) -> dict:
    (path,) = FIXTURES.glob(f"{name_prefix}_*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _body(fixture: dict) -> bytes:
    # The recorder decoded arXiv's UTF-8 bytes as Latin-1 (its Content-Type names no charset); this undoes that.
    return fixture["body"].encode("latin-1")


class FakeArxiv:
    """Answers each request with the recorded response whose URL has the same query parameters."""

    def __init__(self) -> None:
        fixtures = [json.loads(p.read_text(encoding="utf-8")) for p in FIXTURES.glob("*.json")]
        self.recorded = {_key(urlsplit(f["url"]).query): Answer(f["status_code"], _body(f)) for f in fixtures}
        self.script: list[Answer] = []  # answered first, in order, whatever was asked
        self.requests: list[tuple[float, dict]] = []  # (time.monotonic() on arrival, parsed query)
        self.url = ""  # set once the server listens

    def answer(self, query: str) -> Answer:
        self.requests.append((time.monotonic(), parse_qs(query, keep_blank_values=True)))
        if self.script:
            return self.script.pop(0)
        return self.recorded.get(_key(query), Answer(404, b"no recorded response for " + query.encode()))


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out has hung up before a slow answer; that is the test's point


@pytest.fixture
def api():
    fake = FakeArxiv()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = fake.answer(urlsplit(self.path).query)
            time.sleep(answer.delay_s)
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/atom+xml")
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *args) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits for the serving loop to notice, 0.5 s by default.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_port}/api/query"
    yield fake
    server.shutdown()
    server.server_close()


def _client(api: FakeArxiv, **overrides) -> ArxivClient:
    settings = {"base_url": api.url, "min_interval_s": 0.0, "backoff_s": 0.01, "timeout_s": 5.0}
    return ArxivClient(**(settings | overrides))


def test_search_assembles_pages_in_order(api):
    records = list(_client(api, page_size=10).search("testing", max_results=60, sort_by="relevance"))

    assert [params["start"] for _, params in api.requests] == [["0"], ["10"], ["20"], ["30"], ["40"], ["50"]]
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 60
    assert ids[:3] == ["2202.12139", "2405.13786", "2005.14124"]
    assert ids[9:11] == ["1812.11470", "2403.16981"]  # the seam between the first two pages
    assert ids[51] == "cs/0503050" and ids[-1] == "2101.09077"
    first = records[0]
    assert first.title == "Testing Deep Learning Models: A First Comparative Study of Multiple Testing Techniques"
    assert first.abstract.startswith("Deep Learning (DL) has revolutionized the capabilities of vision-based systems")
    assert first.categories == ("cs.SE", "cs.LG")
    assert first.update_date == "2022-02-24"
    assert records[22].title == "$ω$Test: WebView-Oriented Testing for Android Applications"  # UTF-8 decoded


def test_search_starts_at_offset(api):
    ids = [r.id for r in _client(api, page_size=10).search("testing", max_results=10, sort_by="relevance", start=5)]

    assert ids[0] == "1202.4527" and ids[-1] == "1912.04900" and len(ids) == 10


@pytest.mark.parametrize(
    ("fixture", "page_size", "n_expected"),
    [
        ("id_0000.0000", 100, 0),  # totalResults 0
        ("q_testing_s0_m10", 100, 10),  # fewer entries than asked
        ("id_2104.12255v1", 1, 1),  # as many entries as asked, but that was all of totalResults
    ],
)
def test_search_stops_when_feed_is_exhausted(api, fixture, page_size, n_expected):
    api.script = [Answer(200, _body(_load(fixture)))]

    records = list(_client(api, page_size=page_size).search("cat:cs.LG", max_results=500))

    assert len(records) == n_expected
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("asked", "expected_id", "categories", "update_date"),
    [
        ("2104.12255v1", "2104.12255", ("cs.CR",), "2021-04-20"),
        ("1605.08386", "1605.08386", ("math.CO", "math.ST"), "2016-05-26"),
        ("astro-ph/0601001", "astro-ph/0601001", ("astro-ph",), "2006-01-02"),
        ("quant-ph/0201082v1", "quant-ph/0201082", ("quant-ph", "cs.PL"), "2002-01-18"),
    ],
)
def test_fetch_ids_new_and_old_style(api, asked, expected_id, categories, update_date):
    (record,) = _client(api).fetch_ids([asked])

    assert (record.id, record.categories, record.update_date) == (expected_id, categories, update_date)
    assert record.title and record.abstract == " ".join(record.abstract.split())


def test_fetch_ids_skips_unknown_ids(api):
    client = _client(api)

    assert [r.id for r in client.fetch_ids(["0808.05394", "1707.08567"])] == ["1707.08567"]
    assert client.fetch_ids(["0000.0000"]) == []
    assert len(api.requests) == 2  # both ids of the first call went in one request


def test_fetch_ids_chunks_requests_and_keeps_order(api):
    asked = ["quant-ph/0201082v1", "2104.12255v1"]
    api.script = [Answer(200, _body(_load("id_quant-ph_0201082v1"))), Answer(200, _body(_load("id_2104.12255v1")))]

    records = _client(api, page_size=1).fetch_ids(asked)

    assert [params["id_list"] for _, params in api.requests] == [[asked[0]], [asked[1]]]
    assert [r.id for r in records] == ["quant-ph/0201082", "2104.12255"]


def test_fetch_ids_returns_only_what_was_asked_in_that_order(api):
    api.script = [Answer(200, _body(_load("q_testing_s0_m10")))]  # a real feed: 2202.12139, 2405.13786, ...

    records = _client(api).fetch_ids(["2405.13786", "2202.12139v1"])

    assert [r.id for r in records] == ["2405.13786", "2202.12139"]


def test_error_feed_raises_with_the_api_message(api):
    with pytest.raises(ArxivAPIError, match="HTTP 400: incorrect id format for abc"):
        _client(api).fetch_ids(["abc"])
    assert len(api.requests) == 1  # a 4xx is not retried


def test_retries_after_503(api):
    api.script = [Answer(503)]

    (record,) = _client(api).fetch_ids(["1605.08386"])

    assert record.id == "1605.08386"
    assert len(api.requests) == 2


def test_retries_after_timeout(api):
    api.script = [Answer(200, _body(_load("id_1605.08386")), delay_s=1.0)]

    (record,) = _client(api, timeout_s=0.2).fetch_ids(["1605.08386"])

    assert record.id == "1605.08386"
    assert len(api.requests) == 2


def test_gives_up_after_max_retries(api):
    api.script = [Answer(503)] * 4

    with pytest.raises(ArxivAPIError, match=r"127\.0\.0\.1.*gave up after 2 retries; last error: HTTP 503"):
        _client(api, max_retries=2).fetch_ids(["1605.08386"])
    assert len(api.requests) == 3


def test_gives_up_on_connection_errors():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ArxivClient(f"http://127.0.0.1:{port}/api/query", min_interval_s=0.0, max_retries=1, backoff_s=0.01)

    with pytest.raises(ArxivAPIError, match="gave up after 1 retries; last error: URLError"):
        client.fetch_ids(["1605.08386"])


def test_requests_are_rate_limited(api):
    api.script = [Answer(503)]  # a retry must wait its turn too
    interval_s = 0.2

    client = _client(api, page_size=10, min_interval_s=interval_s)
    records = list(client.search("testing", max_results=30, sort_by="relevance"))

    assert len(records) == 30
    arrivals = [t for t, _ in api.requests]
    assert len(arrivals) == 4
    # The client times the start of each request, the server its arrival; localhost jitter is far below 5 ms.
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= interval_s - 0.005


def test_cli_writes_jsonl(api, tmp_path, capsys):
    out = tmp_path / "papers.jsonl"

    main(["--ids", "0808.05394", "1707.08567", "--out", str(out), "--base-url", api.url, "--min-interval-s", "0"])

    (record,) = read_records(out)
    assert record.id == "1707.08567" and record.categories == ("cs.IT",)
    assert record.title == "Proceedings of Workshop AEW10: Concepts in Information Theory and Communications"
    assert f"wrote 1 records to {out}" in capsys.readouterr().out
