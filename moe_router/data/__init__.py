"""Data readers: JSONL intent datasets, BEIR folders, synthetic vectors, and what training asks of each (base)."""

from moe_router.data.base import Dataset, StoredRows, TrainingDefaults, ValidationSet
from moe_router.data.datasets import Record, TextDataset, VectorDataset, load_dataset, load_jsonl

__all__ = [
    "Dataset",
    "Record",
    "StoredRows",
    "TextDataset",
    "TrainingDefaults",
    "ValidationSet",
    "VectorDataset",
    "load_dataset",
    "load_jsonl",
]
