"""The cache-tier patterns built on the counter and on memcache: the write buffer,
rate limits, time series and locks.

May import: ``counter``, ``cache``, ``core``, ``errors``, ``settings``. Never ``tools``.
"""
