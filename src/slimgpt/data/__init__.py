"""Calibration and evaluation text: named corpora resolved offline first, and calibration windows."""

from slimgpt.data.calibration import (
    encode,
    get_calibration,
    needs_bos,
    sample_calibration,
    windows_from_documents,
)
from slimgpt.data.corpora import (
    c4_documents,
    format_alpaca,
    load_documents,
    read_documents,
    read_text,
    wiki_documents,
    wikitext2_test_text,
    wikitext2_train_text,
)

__all__ = [
    "c4_documents",
    "encode",
    "format_alpaca",
    "get_calibration",
    "load_documents",
    "needs_bos",
    "read_documents",
    "read_text",
    "sample_calibration",
    "wiki_documents",
    "wikitext2_test_text",
    "wikitext2_train_text",
    "windows_from_documents",
]
