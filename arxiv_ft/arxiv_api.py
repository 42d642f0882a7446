"""A small client for the arXiv API (export.arxiv.org/api/query): search and id look-ups, rate-limited, with retries.

The only module of the project that touches the network. 2,000 recent cs papers, as JSONL (about a minute, at
arXiv's requested pace of one request every 3 s):

    python -m arxiv_ft.arxiv_api --query 'cat:cs.*' --max-results 2000 --out data/recent-cs.jsonl
    python -m arxiv_ft.arxiv_api --ids 2401.12345 cs/0101001 --out data/some-papers.jsonl
"""

from __future__ import annotations

import argparse
import http.client
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field

from arxiv_ft.records import Record, write_records

_NS = {
    "atom": "http://www.w3.org/2005/Atom",
    "arxiv": "http://arxiv.org/schemas/atom",
    "opensearch": "http://a9.com/-/spec/opensearch/1.1/",
}
_VERSION = re.compile(r"v\d+$")


class ArxivAPIError(RuntimeError):
    """The API refused a request (4xx, with its own message) or kept failing after every retry."""


@dataclass
class ArxivClient:
    """arXiv API client; keeps requests at least `min_interval_s` apart, as arXiv's terms of use ask."""

    base_url: str = "https://export.arxiv.org/api/query"
    min_interval_s: float = 3.0  # between the starts of any two requests, retries included
    max_retries: int = 4  # retries after the first attempt, on 5xx, connection errors and timeouts
    backoff_s: float = 2.0  # wait before the first retry; doubles with each further retry
    timeout_s: float = 30.0
    page_size: int = 100  # results asked for per request (and ids per id_list look-up)
    user_agent: str = "arxiv_ft (fine-tuning LLMs to classify arXiv papers; python urllib)"
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
        """Yield up to `max_results` records matching `query` (e.g. 'cat:cs.*'), a page at a time."""
        end = start + max_results
        while start < end:
            asked = min(self.page_size, end - start)
            records, n_entries, total = self._query(query, "", sort_by, sort_order, start, asked)
            yield from records
            start += asked
            if n_entries < asked or start >= total:
                return

    def fetch_ids(self, ids: list[str]) -> list[Record]:
        """Look up papers by id (new or old style, with or without version), in the order asked; unknown ids skipped."""
        found = {}
        for i in range(0, len(ids), self.page_size):
            chunk = ids[i : i + self.page_size]
            records, _, _ = self._query("", ",".join(chunk), "relevance", "descending", 0, self.page_size)
            found.update((record.id, record) for record in records)
        return [found[bare] for bare in map(_bare_id, ids) if bare in found]

    def _query(
        self, search_query: str, id_list: str, sort_by: str, sort_order: str, start: int, max_results: int
    ) -> tuple[list[Record], int, int]:
        # Every parameter is always sent, empty or not, as the API's own links and our recorded fixtures do.
        params = {
            "search_query": search_query,
            "id_list": id_list,
            "sortBy": sort_by,
            "sortOrder": sort_order,
            "start": start,
            "max_results": max_results,
        }
        return _parse_feed(self._get(f"{self.base_url}?{urllib.parse.urlencode(params)}"))

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self._wait_turn()
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # our request is wrong: asking again will not help
                    raise ArxivAPIError(f"{url}: HTTP {exc.code}: {_api_error(exc.read()) or exc.reason}") from exc
                last_error = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
        raise ArxivAPIError(f"{url}: gave up after {self.max_retries} retries; last error: {last_error}")

    def _wait_turn(self) -> None:
        delay_s = self._last_start + self.min_interval_s - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        self._last_start = time.monotonic()


def _bare_id(text: str) -> str:
    # 'http://arxiv.org/abs/quant-ph/0201082v1' or 'quant-ph/0201082v1' -> 'quant-ph/0201082', as in the snapshot.
    return _VERSION.sub("", text.rsplit("/abs/", 1)[-1])


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _parse_feed(body: bytes) -> tuple[list[Record], int, int]:
    """(records, number of entries, opensearch:totalResults) of one Atom page."""
    root = ET.fromstring(body)
    entries = root.findall("atom:entry", _NS)
    records = []
    for entry in entries:
        title = _collapse(entry.findtext("atom:title", "", _NS))
        if not title:  # the API has answered an unknown id with an empty entry rather than none
            continue
        terms = [category.get("term") for category in entry.iterfind("atom:category", _NS)]
        primary = entry.find("arxiv:primary_category", _NS).get("term")
        records.append(
            Record(
                id=_bare_id(entry.findtext("atom:id", "", _NS)),
                title=title,
                abstract=_collapse(entry.findtext("atom:summary", "", _NS)),
                categories=(primary, *(term for term in terms if term != primary)),
                update_date=entry.findtext("atom:updated", "", _NS)[:10],
            )
        )
    return records, len(entries), int(root.findtext("opensearch:totalResults", "0", _NS))


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


def main(argv: list[str] | None = None) -> None:
    """Command line: fetch a search or a list of ids into a JSONL file of records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", help="an arXiv search query, e.g. 'cat:cs.*' or 'cat:cs.LG AND abs:transformer'")
    what.add_argument("--ids", nargs="+", help="arXiv ids, e.g. 2401.12345 2401.12345v2 cs/0101001")
    parser.add_argument("--max-results", type=int, default=2000, help="with --query: how many papers at most")
    parser.add_argument("--sort-by", default="submittedDate", choices=["submittedDate", "lastUpdatedDate", "relevance"])
    parser.add_argument("--out", required=True, help="JSONL file to write (gzipped if it ends in .gz)")
    parser.add_argument("--base-url", default=ArxivClient.base_url)
    parser.add_argument("--min-interval-s", type=float, default=ArxivClient.min_interval_s)
    args = parser.parse_args(argv)

    client = ArxivClient(base_url=args.base_url, min_interval_s=args.min_interval_s)
    if args.ids:
        records = client.fetch_ids(args.ids)
    else:
        records = client.search(args.query, max_results=args.max_results, sort_by=args.sort_by)
    print(f"wrote {write_records(records, args.out)} records to {args.out}")


if __name__ == "__main__":
    main()
