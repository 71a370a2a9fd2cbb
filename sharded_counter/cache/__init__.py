"""memcache: the client built from settings, a failover cluster, and the counter's
two keys (the cached record and the ``delayed_incr`` stash).

Shared by every memcache user: ``client.py`` builds clients and holds the helpers
(an outage logged once, ``incr`` that creates its key); ``cas.py`` is the one
read-change-cas loop; ``retrying.py`` is how the loops that wait retry.

The cluster: ``cluster.py`` spreads keys over several servers and fails calls
over; ``membership.py`` takes a failed server out and cleans one before it
serves again; ``ring.py`` is the picture of the servers they share;
``keydump.py`` lists the keys a server holds.

The cache tier: ``tier.py`` (``CacheTier``) is what the counters use, over
``guarded.py`` (its calls, failures as ``CacheUnavailable``), ``records.py`` and
``batches.py`` (cached records), ``stashes.py``, ``unsure.py`` and ``sets.py``
(the changes of a stash), ``sightings.py`` (what was last seen in each stash)
and ``backlog.py`` (what failed calls left to do).

Redis and Valkey: ``redis_client.py`` answers pymemcache's calls with memcached's
meaning (docs/cache-backends.md); nothing imports it yet.

May import: ``core``, ``errors``, ``settings``, pymemcache, tenacity, and redis-py
(``redis_client.py`` only: the ``redis`` extra). Never ``store``,
``paths`` or anything above.
"""
