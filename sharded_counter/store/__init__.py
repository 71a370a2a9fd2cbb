"""Datastore: the raw calls, the two write paths, the sum, sets, key records.

``rpc.py`` sends request protobufs down the client's gRPC channel;
``shards.py`` reads and writes ``CounterShard`` entities (transaction and
transform writes, the sum, a set's rewrite, delete); ``keyed.py`` writes the
key records of idempotency keys with their shard; ``joined.py`` stages
increments in a caller's transaction; ``retry.py`` is the retry policy and
the reading of Datastore's errors (may a failed commit have landed?).

May import: ``core``, ``errors``, ``settings``, google-cloud-datastore. Never ``cache``,
``paths`` or anything above.
"""
