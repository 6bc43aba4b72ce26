"""SQLite storage for conversations, sampled replies, feedback and policy versions."""

from store.db import CHOICES, RATINGS, SLOTS, FeedbackError, Store, StoreError

__all__ = ["CHOICES", "RATINGS", "SLOTS", "FeedbackError", "Store", "StoreError"]
