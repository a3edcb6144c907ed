"""Mining (query image, instruction, target image) triplets from web pages, Ray-free.

    pages.py         WARC / WAT / HTML folders / JSONL → `Page`s with their image candidates
    html.py          one HTML document → title and image candidates
    fetch.py         a safe, bounded, concurrent image fetcher (local files and http(s))
    clean.py         size / aspect / icon-ad-tracking rules and a perceptual hash
    text_models.py   the sentence-embedding model (text-text similarity of image metadata)
    captions.py      image captions from a `transformers` image-to-text model (the optional annotator)
    pairs.py         scoring every image pair of a page and selecting at most a few
    instructions.py  instructions from a template or a text-generation model, parsed and checked
"""
