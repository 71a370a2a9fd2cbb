"""memcache: the client built from settings, a failover cluster, and the counter's
two keys (the cached record and the ``delayed_incr`` stash).

``client.py`` builds clients and holds the helpers every memcache user shares;
``cluster.py`` spreads keys over several servers and fails over safely;
``tier.py`` reads, fills and merges cached records and changes stashes.

May import: ``core``, ``errors``, ``settings``, pymemcache. Never ``store``, ``paths``
or anything above.
"""
