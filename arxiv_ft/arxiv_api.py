"""A small client for the arXiv API (export.arxiv.org/api/query): search and id look-ups, rate-limited, with retries.

The only module of the project that touches the network. 2,000 recent cs papers, as JSONL (about a minute, at
arXiv's requested pace of one request every 3 s):

    python -m arxiv_ft.arxiv_api --query 'cat:cs.*' --max-results 2000 --out data/recent-cs.jsonl
    python -m arxiv_ft.arxiv_api --ids 2401.12345 cs/0101001 --out data/some-papers.jsonl

A fetch either returns every paper it was asked for that the API has, or raises `ArxivAPIError`: the API does answer
now and then with an empty or short page, an HTML maintenance page or a truncated body, and each of those used to
end a search early without a word. Such answers are retried like a 503; what is still wrong after the retries is an
error that says how far the fetch got. Entries the API sends without any category are the one thing left out, and
they are counted in `ArxivClient.skipped_entries`.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET  # expands no external entities, and expat refuses billion-laughs amplification
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from arxiv_ft.records import Record, write_records

_NS = {
    "atom": "http://www.w3.org/2005/Atom",
    "arxiv": "http://arxiv.org/schemas/atom",
    "opensearch": "http://a9.com/-/spec/opensearch/1.1/",
}
_FEED = "{http://www.w3.org/2005/Atom}feed"
_VERSION = re.compile(r"v\d+$")


class ArxivAPIError(RuntimeError):
    """The API refused a request (4xx, with its own message), sent too much, or kept failing after every retry."""


class _Transient(Exception):
    """A failure that asking again may cure: 429, 5xx, a network error, a deadline, a body that is not an arXiv feed."""

    def __init__(self, problem: str, retry_after_s: float = 0.0, unresolved: bool = False) -> None:
        super().__init__(problem)
        self.retry_after_s = retry_after_s
        self.unresolved = unresolved  # the host name did not resolve (offline, or a wrong --base-url)


@dataclass(frozen=True)
class _Page:
    url: str
    records: list[Record]
    n_entries: int  # entries in the feed, unusable ones included: what the next page's start counts from
    total: int  # opensearch:totalResults
    skipped: list[str]  # entries left out for lacking an id or any category


@dataclass
class ArxivClient:
    """arXiv API client; keeps requests at least `min_interval_s` apart, as arXiv's terms of use ask."""

    base_url: str = "https://export.arxiv.org/api/query"
    min_interval_s: float = 3.0  # between the starts of any two requests, retries included
    max_retries: int = 4  # retries after the first attempt, on 429, 5xx, network errors, deadlines and bad bodies
    backoff_s: float = 2.0  # wait before the first retry; doubles with each further retry
    timeout_s: float = 30.0  # for each socket operation (connect, each read)
    request_deadline_s: float = 120.0  # for one attempt, whole body included: a byte at a time cannot stall us
    page_deadline_s: float = 600.0  # for one page: all its attempts and waits, Retry-After included
    max_retry_after_s: float = 120.0  # the longest Retry-After honoured; a longer one is cut to this
    max_response_bytes: int = 50_000_000  # a 100-entry page is ~250 KB
    page_size: int = 100  # results asked for per request (and ids per id_list look-up)
    user_agent: str = "arxiv_ft (fine-tuning LLMs to classify arXiv papers; python urllib)"
    skipped_entries: list[str] = field(default_factory=list, init=False)  # every call's entries with no id or category
    _last_start: float = field(default=-math.inf, init=False, repr=False)

    def search(
        self,
        query: str,
        *,
        max_results: int,
        sort_by: str = "submittedDate",
        sort_order: str = "descending",
        start: int = 0,
    ) -> Iterator[Record]:
        """Yield up to `max_results` distinct records matching `query` (e.g. 'cat:cs.*'), a page at a time."""
        seen: set[str] = set()
        offset = start
        while len(seen) < max_results:
            # Pages overlap when papers arrive between two requests; the duplicates must not count towards max_results.
            asked = min(self.page_size, max_results - len(seen))
            page = self._fetch(self._params(query, "", sort_by, sort_order, offset, asked), full=True)
            if page.n_entries < _promised(page.total, offset, asked):
                wanted = min(max_results, max(page.total - start, 0))
                raise ArxivAPIError(
                    f"{page.url}: fetched {len(seen)} of {wanted} papers: the page at start={offset} still had "
                    f"{page.n_entries} entries after {self.max_retries} retries, though totalResults={page.total}"
                )
            self.skipped_entries.extend(page.skipped)
            for record in page.records:
                if record.id not in seen and len(seen) < max_results:
                    seen.add(record.id)
                    yield record
            offset += page.n_entries
            if offset >= page.total:
                return

    def fetch_ids(self, ids: list[str]) -> list[Record]:
        """Look up papers by id (new or old style, with or without version), in the order asked; unknown ids skipped."""
        found: dict[str, Record] = {}
        for i in range(0, len(ids), self.page_size):
            chunk = ids[i : i + self.page_size]
            page = self._fetch(self._params("", ",".join(chunk), "relevance", "descending", 0, self.page_size))
            self.skipped_entries.extend(page.skipped)
            for record in page.records:
                found.setdefault(record.id, record)
        return [found[bare] for bare in map(_bare_id, ids) if bare in found]

    def _params(self, search_query: str, id_list: str, sort_by: str, sort_order: str, start: int, max_results: int):
        # Every parameter is always sent, empty or not, as the API's own links and our recorded fixtures do.
        return {
            "search_query": search_query,
            "id_list": id_list,
            "sortBy": sort_by,
            "sortOrder": sort_order,
            "start": start,
            "max_results": max_results,
        }

    def _fetch(self, params: dict, *, full: bool = False) -> _Page:
        """One page, retried on transient failures and, if `full`, while shorter than totalResults promises.

        A page still short after every retry is returned (the caller knows how far the fetch got); any other failure
        left after the retries, or a wait that would pass `page_deadline_s`, raises ArxivAPIError.
        """
        url = f"{self.base_url}?{urllib.parse.urlencode(params)}"
        give_up_at = time.monotonic() + self.page_deadline_s
        problem, retry_after_s, page = "", 0.0, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                wait_s = max(self.backoff_s * 2 ** (attempt - 1), min(retry_after_s, self.max_retry_after_s))
                if time.monotonic() + wait_s > give_up_at:
                    raise ArxivAPIError(
                        f"{url}: gave up after {attempt - 1} retries: waiting {wait_s:g} s more would pass "
                        f"page_deadline_s={self.page_deadline_s:g}; last error: {problem}"
                    )
                time.sleep(wait_s)
            self._wait_turn()
            try:
                body = self._get(url, min(time.monotonic() + self.request_deadline_s, give_up_at))
                page = _parse_feed(url, body)
            except _Transient as exc:
                if exc.unresolved and attempt:  # once more is enough: an unresolvable name stays unresolvable
                    raise ArxivAPIError(f"{url}: the host name does not resolve (offline?): {exc}") from None
                problem, retry_after_s, page = str(exc), exc.retry_after_s, None
                continue
            promised = _promised(page.total, params["start"], params["max_results"])
            if not full or page.n_entries >= promised:
                return page
            # The API does send empty or short pages now and then; the same request a little later is complete.
            problem, retry_after_s = f"{page.n_entries} entries where totalResults promised {promised}", 0.0
        if page is not None:
            return page
        raise ArxivAPIError(f"{url}: gave up after {self.max_retries} retries; last error: {problem}")

    def _get(self, url: str, deadline: float) -> bytes:
        """The body of one GET, read by chunks so that `deadline` (time.monotonic()) and the size cap hold."""
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
        # A socket timeout past the deadline would let one silent read outlast it; the body loop checks between reads.
        timeout_s = max(min(self.timeout_s, deadline - time.monotonic()), 1e-3)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return self._read_body(url, response, deadline)
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code}", _retry_after_s(exc.headers.get("Retry-After"))) from exc
            # Our request is wrong: asking again will not help.
            message = _api_error(exc.read(self.max_response_bytes)) or exc.reason
            raise ArxivAPIError(f"{url}: HTTP {exc.code}: {message}") from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, IncompleteRead...
            unresolved = isinstance(getattr(exc, "reason", exc), socket.gaierror)
            raise _Transient(f"{type(exc).__name__}: {exc}", unresolved=unresolved) from exc

    def _read_body(self, url: str, response: http.client.HTTPResponse, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        declared_bytes = int(declared) if declared.isdigit() else None
        if declared_bytes is not None and declared_bytes > self.max_response_bytes:
            raise ArxivAPIError(
                f"{url}: a {declared_bytes}-byte answer, over max_response_bytes={self.max_response_bytes}"
            )
        chunks, n_bytes = [], 0
        while chunk := response.read1(1 << 16):  # one recv at most, so the deadline is checked between them
            n_bytes += len(chunk)
            if n_bytes > self.max_response_bytes:
                raise ArxivAPIError(f"{url}: the answer ran past max_response_bytes={self.max_response_bytes}; refused")
            chunks.append(chunk)
            if n_bytes == declared_bytes:
                break
            if time.monotonic() > deadline:
                raise _Transient(
                    f"no complete answer within request_deadline_s={self.request_deadline_s:g} ({n_bytes} bytes read)"
                )
        if declared_bytes is not None and n_bytes < declared_bytes:
            # HTTPResponse.read1 does not raise IncompleteRead when the connection ends early, as read() would.
            raise _Transient(f"the answer ended after {n_bytes} of its {declared_bytes} bytes")
        return b"".join(chunks)

    def _wait_turn(self) -> None:
        delay_s = self._last_start + self.min_interval_s - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        self._last_start = time.monotonic()


def _promised(total: int, start: int, asked: int) -> int:
    """How many entries a page asked for at `start` must hold, when the query has `total` results."""
    return max(min(asked, total - start), 0)


def _retry_after_s(value: str | None) -> float:
    # Only the delay-seconds form; the HTTP-date form (or nothing) leaves the wait to the usual backoff.
    try:
        seconds = float(value or "")
    except ValueError:
        return 0.0
    return seconds if seconds > 0 else 0.0  # also 0 for NaN


def _bare_id(text: str) -> str:
    # 'http://arxiv.org/abs/quant-ph/0201082v1' or 'quant-ph/0201082v1' -> 'quant-ph/0201082', as in the snapshot.
    return _VERSION.sub("", text.rsplit("/abs/", 1)[-1])


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _parse_feed(url: str, body: bytes) -> _Page:
    """One Atom page; a body that is not an arXiv feed is _Transient (proxies and maintenance pages send those)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise _Transient(f"not well-formed XML ({exc}): {body[:80]!r}") from exc
    if root.tag != _FEED:
        raise _Transient(f"not an Atom feed: the root element is <{root.tag}>")
    try:
        total = int(root.findtext("opensearch:totalResults", "", _NS))
    except ValueError as exc:
        raise _Transient("an Atom feed without a valid opensearch:totalResults") from exc
    entries = root.findall("atom:entry", _NS)
    records, skipped = [], []
    for entry in entries:
        title = _collapse(entry.findtext("atom:title", "", _NS))
        if not title:  # the API has answered an unknown id with an empty entry rather than none
            continue
        arxiv_id = _bare_id(entry.findtext("atom:id", "", _NS).strip())
        terms = [term for category in entry.iterfind("atom:category", _NS) if (term := category.get("term"))]
        primary_element = entry.find("arxiv:primary_category", _NS)
        primary = (primary_element.get("term") if primary_element is not None else None) or next(iter(terms), None)
        if not arxiv_id or not primary:  # one bad entry must not end the fetch; the caller counts it instead
            skipped.append(arxiv_id or f"(no id) {title!r}")
            continue
        records.append(
            Record(
                id=arxiv_id,
                title=title,
                abstract=_collapse(entry.findtext("atom:summary", "", _NS)),
                categories=(primary, *(term for term in terms if term != primary)),
                update_date=entry.findtext("atom:updated", "", _NS)[:10],
            )
        )
    return _Page(url, records, len(entries), total, skipped)


def _api_error(body: bytes) -> str | None:
    """The explanation in an arXiv error feed (an entry whose id is under /api/errors), if the body is one."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for entry in root.iterfind("atom:entry", _NS):
        if "/api/errors" in entry.findtext("atom:id", "", _NS):
            return _collapse(entry.findtext("atom:summary", "", _NS))
    return None


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Command line: fetch a search or a list of ids into a JSONL file of records, written only if all of it came."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.options import FetchConfig

    cfg = parse_config(FetchConfig, argv, __doc__, prog)
    client = ArxivClient(base_url=cfg.base_url, min_interval_s=cfg.min_interval_s)
    out = Path(cfg.out)
    existed = out.exists()
    # Same suffix as --out, so write_records gzips it alike; renamed over --out only once every page has come.
    partial = out.with_name(f"{out.stem}.partial-{os.getpid()}{out.suffix}")
    try:
        if cfg.ids:
            records = client.fetch_ids([i.strip() for i in cfg.ids.split(",") if i.strip()])
        else:
            records = client.search(cfg.query, max_results=cfg.max_results, sort_by=cfg.sort_by)
        n = write_records(records, partial)  # a search is a generator: its pages are fetched while this writes
        partial.replace(out)
    except ArxivAPIError as exc:
        raise SystemExit(f"error: {exc}\n{out} " + ("is left as it was" if existed else "was not written")) from None
    finally:
        partial.unlink(missing_ok=True)
    if client.skipped_entries:
        shown = ", ".join(client.skipped_entries[:10]) + (", ..." if len(client.skipped_entries) > 10 else "")
        print(f"skipped {len(client.skipped_entries)} entries with no id or no category: {shown}", file=sys.stderr)
    print(f"wrote {n} records to {out}")


if __name__ == "__main__":
    main()
