"""The arXiv client against real recorded API responses, served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import re
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
    delay_s: float = 0.0  # before the status line
    headers: tuple[tuple[str, str], ...] = ()  # sent after Content-Type and Content-Length
    drip_s: float = 0.0  # the body a byte at a time, this far apart
    declare_length: bool = True  # False: no Content-Length, the body ends when the connection closes


def _key(query: str) -> tuple:
    # Parameter order and percent-encoding differ between clients; the parsed parameters must not.
    return tuple(sorted((k, tuple(v)) for k, v in parse_qs(query, keep_blank_values=True).items()))


def _load(name_prefix: str) -> dict:
    (path,) = FIXTURES.glob(f"{name_prefix}_*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _body(fixture: dict) -> bytes:
    # The recorder decoded arXiv's UTF-8 bytes as Latin-1 (its Content-Type names no charset); this undoes that.
    return fixture["body"].encode("latin-1")


def _entries(name_prefix: str) -> list[str]:
    """The <entry> elements of a recorded feed, as text, in order."""
    return re.findall(r"  <entry>.*?</entry>\n", _body(_load(name_prefix)).decode("utf-8"), flags=re.DOTALL)


def _feed(entries: list[str], *, total: int) -> bytes:
    """A feed as the API writes one (a recorded page's header), holding `entries` and claiming `total` results."""
    head = _body(_load("q_testing_s0_m10")).decode("utf-8").split("  <entry>", 1)[0]
    head = re.sub(r"<opensearch:totalResults>\d+<", f"<opensearch:totalResults>{total}<", head)
    return (head + "".join(entries) + "</feed>\n").encode("utf-8")


def _entry_id(entry: str) -> str:
    return re.search(r"<id>http://arxiv.org/abs/(.*?)v\d+</id>", entry).group(1)


def _renumbered(entry: str, new_id: str) -> str:
    return re.sub(r"<id>http://arxiv.org/abs/.*?</id>", f"<id>http://arxiv.org/abs/{new_id}v1</id>", entry, count=1)


def _testing_entries() -> list[str]:
    """The 60 distinct entries of the recorded 'testing' pages at starts 0, 10, ..., 50, in ranking order."""
    return [entry for start in range(0, 60, 10) for entry in _entries(f"q_testing_s{start}_m10")]


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
            if answer.declare_length:
                self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers:
                self.send_header(name, value)
            self.end_headers()
            if not answer.drip_s:
                self.wfile.write(answer.body)
            for i in range(len(answer.body) if answer.drip_s else 0):
                self.wfile.write(answer.body[i : i + 1])
                time.sleep(answer.drip_s)

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
    ("body", "page_size", "n_expected"),
    [
        (_body(_load("id_0000.0000")), 100, 0),  # totalResults 0
        (_feed(_entries("q_testing_s0_m10"), total=10), 100, 10),  # fewer entries than asked: all of totalResults
        (_body(_load("id_2104.12255v1")), 1, 1),  # as many entries as asked, but that was all of totalResults
    ],
)
def test_search_stops_when_feed_is_exhausted(api, body, page_size, n_expected):
    api.script = [Answer(200, body)]

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
    # The client times the start of each request, the server its arrival: on a loaded machine, localhost jitter has
    # passed 5 ms. 20 ms still tells the 0.2 s limit from none (the gaps would be the 0.01 s backoff).
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= interval_s - 0.02


def test_cli_writes_jsonl(api, tmp_path, capsys):
    out = tmp_path / "papers.jsonl"

    main(["--ids", "0808.05394", "1707.08567", "--out", str(out), "--base-url", api.url, "--min-interval-s", "0"])

    (record,) = read_records(out)
    assert record.id == "1707.08567" and record.categories == ("cs.IT",)
    assert record.title == "Proceedings of Workshop AEW10: Concepts in Information Theory and Communications"
    assert f"wrote 1 records to {out}" in capsys.readouterr().out


def test_search_retries_an_empty_or_short_page(api):
    pages = [_entries(f"q_testing_s{start}_m10") for start in (0, 10, 20)]
    api.script = [
        Answer(200, _feed(pages[0], total=30)),
        Answer(200, _feed([], total=30)),  # the real API sends such empty pages now and then
        Answer(200, _feed(pages[1][:4], total=30)),
        Answer(200, _feed(pages[1], total=30)),
        Answer(200, _feed(pages[2], total=30)),
    ]

    records = list(_client(api, page_size=10).search("testing", max_results=100, sort_by="relevance"))

    assert [r.id for r in records] == [_entry_id(entry) for page in pages for entry in page]
    assert [params["start"] for _, params in api.requests] == [["0"], ["10"], ["10"], ["10"], ["20"]]


def test_search_raises_rather_than_return_a_short_result(api):
    first, second = _entries("q_testing_s0_m10"), _entries("q_testing_s10_m10")
    api.script = [Answer(200, _feed(first, total=30))] + [Answer(200, _feed(second[:5], total=30))] * 3

    with pytest.raises(
        ArxivAPIError, match="fetched 10 of 30 papers: the page at start=10 still had 5 entries after 2"
    ):
        list(_client(api, page_size=10, max_retries=2).search("testing", max_results=50, sort_by="relevance"))
    assert len(api.requests) == 4


def test_search_drops_the_overlap_of_pages_and_pages_on(api):
    # A paper published after the first page pushes every later one down by one: the second page repeats the
    # first page's last entry, and totalResults grows by one. The new paper itself ranks before the first page.
    ranking = _testing_entries()[:30]
    api.script = [
        Answer(200, _feed(ranking[0:10], total=30)),
        Answer(200, _feed(ranking[9:19], total=31)),
        Answer(200, _feed(ranking[19:29], total=31)),
        Answer(200, _feed(ranking[29:30], total=31)),
    ]

    records = list(_client(api, page_size=10).search("testing", max_results=30, sort_by="relevance"))

    assert [r.id for r in records] == [_entry_id(entry) for entry in ranking]
    asked = [(params["start"], params["max_results"]) for _, params in api.requests]
    assert asked == [(["0"], ["10"]), (["10"], ["10"]), (["20"], ["10"]), (["30"], ["1"])]


@pytest.mark.parametrize(
    "body",
    [
        b"<html><head><title>Down for maintenance</title></head><body><p>Back soon.</p></body></html>",
        b"<?xml version='1.0'?><rss version='2.0'><channel><title>arXiv</title></channel></rss>",
    ],
)
def test_xml_that_is_no_atom_feed_is_retried_then_refused(api, body):
    api.script = [Answer(200, body)]

    (record,) = _client(api).fetch_ids(["1605.08386"])

    assert record.id == "1605.08386" and len(api.requests) == 2
    api.script = [Answer(200, body)] * 3
    with pytest.raises(ArxivAPIError, match=r"127\.0\.0\.1.* 2 retries; last error: not an Atom feed: .* <(html|rss)>"):
        _client(api, max_retries=2).fetch_ids(["1605.08386"])


_FULL = _body(_load("id_1605.08386"))


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (Answer(200, _FULL[:900]), "not well-formed XML"),  # cut mid-element, with a Content-Length to match
        (Answer(200, b"<html><body><p>502 Bad Gateway<br></body></html>"), "not well-formed XML"),  # HTML, not XML
        (Answer(200, b""), "not well-formed XML"),
        (
            Answer(200, _FULL[:900], headers=(("Content-Length", str(len(_FULL))),), declare_length=False),
            f"the answer ended after 900 of its {len(_FULL)} bytes",
        ),
    ],
)
def test_truncated_or_html_body_is_retried_then_refused(api, bad, problem):
    api.script = [bad]

    (record,) = _client(api).fetch_ids(["1605.08386"])

    assert record.id == "1605.08386" and len(api.requests) == 2
    api.script = [bad] * 2
    with pytest.raises(ArxivAPIError, match=rf"127\.0\.0\.1.*id_list=1605\.08386.* 1 retries; last error: {problem}"):
        _client(api, max_retries=1).fetch_ids(["1605.08386"])


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_are_retried_after_retry_after(api, status):
    api.script = [Answer(status, headers=(("Retry-After", "1"),))]

    (record,) = _client(api).fetch_ids(["1605.08386"])

    assert record.id == "1605.08386"
    (first_s, _), (second_s, _) = api.requests
    assert second_s - first_s >= 1.0 - 0.02  # the backoff alone would have waited 0.01 s


def test_retry_after_is_capped_and_counts_against_the_page_deadline(api):
    api.script = [Answer(429, headers=(("Retry-After", "3600"),))]

    (record,) = _client(api, max_retry_after_s=0.2).fetch_ids(["1605.08386"])

    (first_s, _), (second_s, _) = api.requests
    assert record.id == "1605.08386" and 0.2 - 0.02 <= second_s - first_s < 2.0
    api.script = [Answer(429, headers=(("Retry-After", "3600"),))]
    started_s = time.monotonic()
    with pytest.raises(ArxivAPIError, match="waiting 120 s more would pass page_deadline_s=60; last error: HTTP 429"):
        _client(api, page_deadline_s=60).fetch_ids(["1605.08386"])
    assert time.monotonic() - started_s < 1.0  # refused at once, not after a minute's wait


def test_other_4xx_fail_at_once_whatever_retry_after_says(api):
    api.script = [Answer(403, b"Forbidden", headers=(("Retry-After", "0"),))]

    with pytest.raises(ArxivAPIError, match="HTTP 403: Forbidden"):
        _client(api).fetch_ids(["1605.08386"])
    assert len(api.requests) == 1


def test_entry_without_primary_category_falls_back_to_its_first_category_or_is_skipped(api, tmp_path, capsys):
    entries = _entries("q_testing_s0_m10")
    no_primary = re.sub(r"\s*<arxiv:primary_category[^>]*/>", "", entries[0])
    no_category = re.sub(r"\s*<(arxiv:primary_category|category)[^>]*/>", "", entries[1])
    assert no_primary != entries[0] and "category" not in no_category
    feed = _feed([no_primary, no_category, *entries[2:]], total=10)
    api.script = [Answer(200, feed)]
    client = _client(api)

    records = list(client.search("testing", max_results=10, sort_by="relevance"))

    assert [r.id for r in records] == [_entry_id(entry) for entry in [entries[0], *entries[2:]]]
    assert records[0].categories == ("cs.SE", "cs.LG")  # the first <category> was also the primary one
    assert client.skipped_entries == ["2405.13786"]
    out = tmp_path / "papers.jsonl"
    api.script = [Answer(200, feed)]
    main(["--ids", "2202.12139", "2405.13786", "--out", str(out), "--base-url", api.url, "--min-interval-s", "0"])
    assert [r.id for r in read_records(out)] == ["2202.12139"]
    assert "skipped 1 entries with no id or no category: 2405.13786" in capsys.readouterr().err


def test_a_server_dripping_bytes_is_cut_off_at_the_request_deadline(api):
    dripping = Answer(200, _FULL, drip_s=0.05)  # ~2 KB: 100 s at this pace, though no single read waits 1 s
    api.script = [dripping]
    started_s = time.monotonic()

    (record,) = _client(api, timeout_s=1.0, request_deadline_s=0.5).fetch_ids(["1605.08386"])

    assert record.id == "1605.08386" and len(api.requests) == 2
    assert time.monotonic() - started_s < 2.0
    api.script = [dripping] * 2
    with pytest.raises(ArxivAPIError, match=r"last error: no complete answer within request_deadline_s=0\.5"):
        _client(api, timeout_s=1.0, request_deadline_s=0.5, max_retries=1).fetch_ids(["1605.08386"])


@pytest.mark.parametrize("declare_length", [True, False])
def test_an_answer_over_max_response_bytes_is_refused(api, declare_length):
    api.script = [Answer(200, _FULL, declare_length=declare_length)]  # 1,967 bytes

    with pytest.raises(ArxivAPIError, match="max_response_bytes=1000"):
        _client(api, max_response_bytes=1000).fetch_ids(["1605.08386"])
    assert len(api.requests) == 1  # asking again would only fetch as much again
    assert ArxivClient.max_response_bytes >= 100 * len(_FULL)  # the default leaves a 100-entry page plenty of room


def test_cli_leaves_out_as_it_was_when_a_later_page_fails(api, tmp_path):
    out = tmp_path / "papers.jsonl"
    out.write_text("an earlier fetch\n")
    entries = _testing_entries()
    first_page = entries + [_renumbered(entry, f"9901.{i:05d}") for i, entry in enumerate(entries[:40])]
    api.script = [Answer(200, _feed(first_page, total=250)), Answer(400, _body(_load("id_abc")))]
    common = ["--out", str(out), "--base-url", api.url, "--min-interval-s", "0"]

    with pytest.raises(SystemExit) as exit_:
        main(["--query", "testing", "--max-results", "250", *common])

    assert "start=100" in str(exit_.value.code) and "HTTP 400: incorrect id format for abc" in str(exit_.value.code)
    assert out.read_text() == "an earlier fetch\n"
    assert sorted(tmp_path.iterdir()) == [out]  # no partial file left behind
    main(["--ids", "1605.08386", *common])
    assert [r.id for r in read_records(out)] == ["1605.08386"] and sorted(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize(
    ("doctype", "problem"),
    [
        ('<!DOCTYPE feed [<!ENTITY xxe SYSTEM "file:///etc/hostname">]>', "undefined entity &xxe;"),  # XXE
        (  # billion laughs: ten to the ninth "lol"s from a 1 KB body
            "<!DOCTYPE feed [<!ENTITY lol0 'lol'>"
            + "".join(f"<!ENTITY lol{i} '{f'&lol{i - 1};' * 10}'>" for i in range(1, 10))
            + "]>",
            "limit on input amplification factor",
        ),
    ],
)
def test_entities_are_not_expanded(api, doctype, problem):
    entity = "&xxe;" if "xxe" in doctype else "&lol9;"
    feed = _feed([_entries("q_testing_s0_m10")[0].replace("<title>", f"<title>{entity}", 1)], total=1).decode()
    api.script = [Answer(200, feed.replace("<feed ", f"{doctype}<feed ", 1).encode())] * 2

    with pytest.raises(ArxivAPIError, match=f"last error: not well-formed XML \\({problem}"):
        list(_client(api, max_retries=1).search("testing", max_results=1))


def test_an_unresolvable_host_is_tried_twice_then_refused_at_once(tmp_path, monkeypatch):
    """Offline, the fetch spent 32.7 s retrying a DNS failure and then said the output 'is left as it was' although it
    never existed. A name that does not resolve is tried once more, then refused; the message says nothing was
    written. (Name resolution is replaced by a failing one: no query leaves the machine.)"""
    import socket

    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    out = tmp_path / "papers.jsonl"
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main(["--ids", "1605.08386", "--out", str(out), "--base-url", "http://arxiv-ft-test.invalid/api/query"])
    assert time.monotonic() - started < 10
    assert "does not resolve" in str(exit_.value.code) and "was not written" in str(exit_.value.code)
    assert lookups == ["arxiv-ft-test.invalid"] * 2 and not out.exists()
