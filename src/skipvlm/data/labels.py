"""The label conventions shared by the collator that writes training labels and the code that reads them.

The collator (:mod:`skipvlm.data.chat`) marks every token that is not supervised (the prompt, the
padding) with :data:`IGNORE_INDEX`; the losses skip those tokens and the PIA adapters pool over the
prompt they mark (``shared/METHODS.md`` §2). Import the value from here; never write ``-100``.
"""

__all__ = ["IGNORE_INDEX"]

# transformers' and torch's cross-entropy ignore this label by default (ignore_index=-100)
IGNORE_INDEX = -100
