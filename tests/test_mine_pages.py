"""Mining readers: WARC, WAT, HTML files and JSONL pages → pages with image candidates, or rejects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mine_corpus import png, wat_envelope, write_warc, write_wat

from magiclens_core.mining.html import largest_srcset, parse_html
from magiclens_core.mining.pages import page_format, read_pages
from magiclens_core.mining.records import Page, Reject

FIXTURE_WARCS = Path(__file__).parent / "fixtures" / "warc"

ARTICLE = """<!doctype html><html><head><title>  Red things  </title><base href="https://cdn.example/img/"></head>
<body><p>intro<figure><img src="a.png" alt="a red circle" title="circle"><figcaption>The circle, in red
</figcaption></figure><div><span>Below: a red square</span><img data-src="/abs/b.png" alt="square"></div>
<img srcset="c-small.png 320w, c-large.png 1280w, c-mid.png 640w" src="c.png" width="600" height="400px">
<img src="a.png" alt="again"><img src="data:image/gif;base64,R0lGOD"><img src="javascript:alert(1)">
<table><tr><td><img src=https://other.example/d.jpg alt=unquoted></td>
"""  # broken markup on purpose: unclosed <p>, <table>, <td>, <body>


def test_html_candidates_resolve_against_base_and_keep_metadata():
    title, images, unusable = parse_html(ARTICLE, "https://site.example/posts/1.html")
    assert title == "Red things"
    assert [image.url for image in images] == [
        "https://cdn.example/img/a.png", "https://cdn.example/abs/b.png", "https://cdn.example/img/c-large.png",
        "https://other.example/d.jpg"]
    first, second, third, fourth = images
    assert (first.alt, first.title, first.caption) == ("a red circle", "circle", "The circle, in red")
    assert second.caption == "Below: a red square" and second.alt == "square"
    assert (third.width, third.height) == (600, 400)
    assert fourth.alt == "unquoted"
    assert [image.position for image in images] == [0, 1, 2, 3]
    assert unusable == 2  # the data: URI and the javascript: one


def test_largest_srcset_by_width_or_density():
    assert largest_srcset("a.png 1x, b.png 2x") == "b.png"
    assert largest_srcset("a.png 100w,b.png 50w") == "a.png"
    assert largest_srcset("only.png") == "only.png"


def test_warc_pages_use_the_images_stored_in_the_archive(tmp_path):
    stored = png(80, 60)
    warc = write_warc(tmp_path / "crawl.warc.gz", {
        "http://shop.example/p/1": '<title>Shop</title><img src="/i/1.png" alt="one"><img src="/i/2.png">',
        "http://shop.example/p/2": "<title>Other</title><p>no images",
    }, {"http://shop.example/i/1.png": stored})
    records = list(read_pages(str(warc)))
    assert all(isinstance(record, Page) for record in records)
    first, second = records
    assert first.url == "http://shop.example/p/1" and first.title == "Shop"
    assert [image.url for image in first.images] == ["http://shop.example/i/1.png", "http://shop.example/i/2.png"]
    assert first.images[0].data == stored and first.images[1].data is None
    assert second.images == [] and second.page_id != first.page_id
    assert first.page_id == next(iter(read_pages(str(warc)))).page_id  # stable across reads


def test_wat_pages_from_img_links(tmp_path):
    wat = write_wat(tmp_path / "crawl.wat.gz", [
        wat_envelope("http://blog.example/a/post", "A post", [
            {"path": "IMG@/src", "url": "pic.jpg", "alt": "a dog"},
            {"path": "A@/href", "url": "/elsewhere"},
            {"path": "IMG@/src", "url": "https://img.example/x.png", "title": "x"},
            {"path": "IMG@/src", "url": "pic.jpg", "alt": "duplicate"}]),
        b"{not json",
        {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": "http://x.example/"}}},  # no HTML metadata
    ])
    records = list(read_pages(str(wat)))
    pages = [r for r in records if isinstance(r, Page)]
    rejects = [r for r in records if isinstance(r, Reject)]
    assert len(pages) == 1 and pages[0].title == "A post"
    assert [(i.url, i.alt, i.title) for i in pages[0].images] == [
        ("http://blog.example/a/pic.jpg", "a dog", ""), ("https://img.example/x.png", "", "x")]
    assert [r.reason for r in rejects] == ["bad_metadata_json"]


def test_html_files_and_jsonl_pages(tmp_path):
    (tmp_path / "page.html").write_text('<title>Local</title><img src="pics/one.png" alt="one">')
    lines = [json.dumps({"url": "https://j.example/a/", "title": "J", "images": [
                 {"src": "x.png", "alt": "x"}, "https://j.example/y.png", {"alt": "no source"}]}),
             json.dumps({"url": "https://j.example/b", "html": "<title>From html</title><img src=z.png>"}),
             "[1, 2]", "{broken", ""]
    (tmp_path / "pages.jsonl").write_text("\n".join(lines))
    (page,) = read_pages(str(tmp_path / "page.html"))
    assert page.url == (tmp_path / "page.html").as_uri() and page.title == "Local"
    assert page.images[0].url == (tmp_path / "pics" / "one.png").as_uri()
    records = list(read_pages(str(tmp_path / "pages.jsonl")))
    first, second = records[:2]
    assert [i.url for i in first.images] == ["https://j.example/a/x.png", "https://j.example/y.png"]
    assert second.title == "From html" and second.images[0].url == "https://j.example/z.png"
    assert [(r.reason, r.detail.split(":")[0]) for r in records[2:]] == [("bad_page_json", "line 3"),
                                                                           ("bad_page_json", "line 4")]


def test_unknown_and_missing_files_are_rejects(tmp_path):
    assert page_format("a.WARC.GZ") == "warc" and page_format("x.wat.gz") == "wat" and page_format("x.txt") is None
    (reject,) = read_pages(str(tmp_path / "notes.txt"))
    assert reject.reason == "unknown_format"
    (reject,) = read_pages(str(tmp_path / "missing.warc.gz"))
    assert reject.reason == "damaged_archive" and "missing.warc.gz" in reject.source


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURE_WARCS.glob("*.warc*")))
def test_real_warc_files_read_or_reject_without_crashing(name, tmp_path):
    path = shutil.copy(FIXTURE_WARCS / name, tmp_path / name)
    records = list(read_pages(str(path)))
    pages = [r for r in records if isinstance(r, Page)]
    rejects = [r for r in records if isinstance(r, Reject)]
    if name == "example-trunc.warc":
        assert [r.reason for r in rejects] == ["damaged_archive"] and "after 1 pages" in rejects[0].detail
    elif name == "example-space-in-target-uri.warc.gz":
        assert records == []  # one PNG resource and no page
    else:
        assert rejects == []
        assert pages and all(p.title for p in pages)
        expected = "http://www.iana.org/" if "iana" in name else "http://example.com/"
        assert pages[0].url == expected  # wget's <...> unwrapped
