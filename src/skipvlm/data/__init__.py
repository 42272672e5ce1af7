"""Data in: chat-style examples, their loaders, and the collator that turns them into model batches."""

from skipvlm.data.chat import ChatCollator, ChatExample, load_jsonl, load_processor

__all__ = ["ChatCollator", "ChatExample", "load_jsonl", "load_processor"]
