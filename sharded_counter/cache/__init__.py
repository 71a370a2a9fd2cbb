"""The cache (memcached, Redis or Valkey): one protocol, a backend per kind of server,
and the counter's two keys (the cached record and the ``delayed_incr`` stash).

Shared by every cache user: ``client.py`` names the calls (the cache protocol),
builds clients and holds the helpers
(an outage logged once, ``incr`` that creates its key); ``cas.py`` is the one
read-change-cas loop; ``retrying.py`` is how the loops that wait retry.

The backends, each answering the calls the tier makes with memcached's meaning:
``memcached/`` (one server, or several as a failover cluster that cleans a server
before it serves again) and ``redis/`` (Redis or Valkey). ``by_url.py`` chooses
one from the settings; nothing else knows which it is.

The cache tier: ``tier.py`` (``CacheTier``) is what the counters use, over
``guarded.py`` (its calls, failures as ``CacheUnavailable``), ``records.py`` and
``batches.py`` (cached records), ``stashes.py``, ``unsure.py`` and ``sets.py``
(the changes of a stash), ``sightings.py`` (what was last seen in each stash)
and ``backlog.py`` (what failed calls left to do).

May import: ``core``, ``errors``, ``settings``, pymemcache, tenacity, and redis-py
(``redis/`` only: the ``redis`` extra). Never ``store``,
``paths`` or anything above.
"""
