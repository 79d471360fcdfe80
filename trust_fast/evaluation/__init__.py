"""Evaluation harness: sampling, concept presence (UA), retain accuracy, reports."""
from .metrics import evaluate, format_table, sample_images

__all__ = ["evaluate", "format_table", "sample_images"]
