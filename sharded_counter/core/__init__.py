"""The protocol's core: the exactness decisions and encodings, as pure code.

Write tokens and fences (``tokens.py``), what ``delayed_incr`` holds and how it
changes (``stash.py``), the cached record and its merge (``record.py``), what a
write does next after each outcome (``outcomes.py``), key names (``keys.py``)
and input checks (``validation.py``); and the effects that the paths' steps ask
a shell to carry out, with the loops that drive them (``effects.py``). Nothing
here does I/O or takes a lock, and nothing reads a clock it is not handed (a
retry policy handed to ``effects.retrying`` reads its own), so the sync and
async shells share every decision, and each can be tested exhaustively.

May import: the standard library, other modules of ``core``, and tenacity's
strategy objects (``effects.retrying`` runs a policy's decisions, which read the
clock; never its sleep). Nothing else.
"""
