"""Data in: chat-style examples, loaders for the field's formats, and the collator that builds batches."""

from skipvlm.data.chat import ChatCollator, ChatExample, load_processor
from skipvlm.data.formats import load_chat_jsonl, load_hf_dataset, load_jsonl, load_llava, load_scienceqa

__all__ = [
    "ChatCollator",
    "ChatExample",
    "load_chat_jsonl",
    "load_hf_dataset",
    "load_jsonl",
    "load_llava",
    "load_processor",
    "load_scienceqa",
]
