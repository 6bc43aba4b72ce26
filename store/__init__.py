"""SQLite storage for conversations, sampled replies, feedback and policy versions."""

from store.annotators import AnnotatorError
from store.db import CHOICES, DEFAULT_DB, RATINGS, SLOTS, FeedbackError, Store, StoreError

__all__ = ["AnnotatorError", "CHOICES", "DEFAULT_DB", "RATINGS", "SLOTS", "FeedbackError", "Store", "StoreError"]
