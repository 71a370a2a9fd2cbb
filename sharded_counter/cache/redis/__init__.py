"""Redis and Valkey as the cache, with memcached's meaning for every call the tier makes.

``commands.py`` says what each call sends and how its answer reads, with no I/O;
``client.py`` sends them from threads to one server. Imported only when a
``cache_url`` names Redis or Valkey: redis-py is the ``redis`` extra.
"""
