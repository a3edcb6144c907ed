"""Reader choice for mining, measured: WARC records/s of FastWARC vs warcio, and HTML pages/s of selectolax
(Lexbor) vs Resiliparse vs BeautifulSoup, on the same generated files. Prints one JSON object.

    python tests/perf/mine_readers.py [--pages 3000] [--repeat 3]

WARC: a gzipped WARC of `--pages` HTML responses (~20 KB each, 12 images per page) and one image response
per 10 pages, written with warcio; each reader iterates every record and reads its whole payload (HTTP
headers parsed, chunked/gzip payloads decoded). HTML: each parser parses the same pages and collects every
`<img>` with its src, srcset, alt and title. Best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mine_corpus import png, write_warc  # noqa: E402


def page_html(index: int) -> str:
    text = " ".join(f"word{(index * 7 + k) % 997}" for k in range(2200))
    images = "".join(f'<figure><img src="/img/{index}-{k}.png" alt="picture {k} of page {index}" title="t{k}" '
                     f'srcset="/img/{index}-{k}-s.png 320w, /img/{index}-{k}-l.png 1280w">'
                     f"<figcaption>caption {k}</figcaption></figure><p>{text[k * 100:(k + 1) * 100]}"
                     for k in range(12))
    return f"<!doctype html><html><head><title>Page {index}</title></head><body><p>{text}{images}</body></html>"


def best(runs: int, function) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def fastwarc_records(path: Path) -> int:
    from fastwarc.warc import ArchiveIterator

    count = 0
    with open(path, "rb") as stream:
        for record in ArchiveIterator(stream, parse_http=True, auto_decode="all"):
            record.reader.read()
            count += 1
    return count


def warcio_records(path: Path) -> int:
    from warcio.archiveiterator import ArchiveIterator

    count = 0
    with open(path, "rb") as stream:
        for record in ArchiveIterator(stream):
            record.content_stream().read()
            count += 1
    return count


def selectolax_images(pages: list[str]) -> int:
    from selectolax.lexbor import LexborHTMLParser

    found = 0
    for html in pages:
        for node in LexborHTMLParser(html).css("img"):
            attributes = node.attributes
            found += bool((attributes.get("src"), attributes.get("srcset"), attributes.get("alt"),
                           attributes.get("title")))
    return found


def resiliparse_images(pages: list[str]) -> int:
    from resiliparse.parse.html import HTMLTree

    found = 0
    for html in pages:
        for node in HTMLTree.parse(html).document.query_selector_all("img"):
            found += bool((node.getattr("src"), node.getattr("srcset"), node.getattr("alt"), node.getattr("title")))
    return found


def bs4_images(pages: list[str]) -> int:
    from bs4 import BeautifulSoup

    found = 0
    for html in pages:
        for node in BeautifulSoup(html, "html.parser").find_all("img"):
            found += bool((node.get("src"), node.get("srcset"), node.get("alt"), node.get("title")))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--html-pages", type=int, default=300, help="pages parsed by each HTML parser")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pages = {f"http://site.example/p/{i}": page_html(i) for i in range(args.pages)}
    images = {f"http://site.example/img/{i}-0.png": png(64, 64, stripe=i) for i in range(0, args.pages, 10)}
    with tempfile.TemporaryDirectory() as folder:
        warc = write_warc(Path(folder) / "bench.warc.gz", pages, images)
        records = fastwarc_records(warc)
        assert records == warcio_records(warc) == len(pages) + len(images) + 1
        fast = records / best(args.repeat, lambda: fastwarc_records(warc))
        slow = records / best(args.repeat, lambda: warcio_records(warc))
        size = warc.stat().st_size
    sample = list(pages.values())[: args.html_pages]
    parsers = {"selectolax": selectolax_images, "resiliparse": resiliparse_images, "bs4_html_parser": bs4_images}
    counts = {name: function(sample) for name, function in parsers.items()}
    assert len(set(counts.values())) == 1, counts
    html_rates = {name: round(len(sample) / best(args.repeat, lambda f=function: f(sample)), 1)
                  for name, function in parsers.items()}
    print(json.dumps({
        "warc": {"records": records, "file_mb": round(size / 2**20, 1),
                 "fastwarc_records_per_s": round(fast, 1), "warcio_records_per_s": round(slow, 1),
                 "fastwarc_speedup": round(fast / slow, 2)},
        "html": {"pages": len(sample), "pages_per_s": html_rates,
                 "selectolax_vs_bs4": round(html_rates["selectolax"] / html_rates["bs4_html_parser"], 1),
                 "selectolax_vs_resiliparse": round(html_rates["selectolax"] / html_rates["resiliparse"], 2)},
    }))


if __name__ == "__main__":
    main()
