"""The protocol's core: the exactness decisions and encodings, as pure code.

Write tokens and fences (``tokens.py``), what ``delayed_incr`` holds and how it
changes (``stash.py``), the cached record and its merge (``record.py``), what a
write does next after each outcome (``outcomes.py``), key names (``keys.py``)
and input checks (``validation.py``). Nothing here does I/O, takes a lock or
reads a clock it is not handed, so the sync and async shells share every
decision, and each can be tested exhaustively.

May import: the standard library and other modules of ``core``. Nothing else.
"""
