"""Evaluation harness: sampling, concept presence (UA), retain accuracy, quality distance, attacks, reports."""
from .attacks import embedding_attack, inversion_attack, paraphrase_attack, softprompt_attack
from .generic import generic_report
from .metrics import evaluate, format_table, frechet_distance, quality_distance, sample_images
from .report import ATTACKS, full_report

__all__ = ["evaluate", "format_table", "frechet_distance", "quality_distance", "sample_images",
           "paraphrase_attack", "softprompt_attack", "embedding_attack", "inversion_attack", "full_report", "generic_report", "ATTACKS"]
