"""Data: JSONL datasets, synthetic vectors, routing targets, building a router from a dataset."""

from moe_router.data.datasets import Record, TextDataset, VectorDataset, load_dataset, load_jsonl

__all__ = ["Record", "TextDataset", "VectorDataset", "load_dataset", "load_jsonl"]
