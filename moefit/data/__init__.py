"""Data pipeline: read and validate files, render through the chat template with loss masks, pack, batch."""

from ..labels import IGNORE_INDEX
from .check import CheckReport, check_data
from .dataset import DataBundle, DataPosition, build_datasets, collate, fingerprint, iterate_batches
from .formats import FORMATS, BadLine, Sample, read_data
from .render import render_sample
from .report import DataReport
from .tokenizer import load_tokenizer

__all__ = [
    "FORMATS", "IGNORE_INDEX", "BadLine", "CheckReport", "DataBundle", "DataPosition", "DataReport", "Sample",
    "build_datasets", "check_data", "collate", "fingerprint", "iterate_batches", "load_tokenizer", "read_data", "render_sample",
]
