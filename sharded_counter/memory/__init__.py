"""In-memory models of what the protocol talks to: Datastore (``datastore.py``) and
memcached (``cache.py``).

They answer the same calls as the real servers, with the same meaning, and
keep no clock and no threads of their own: the simulator
(``tools/simulate``) drives them in virtual time and injects the faults. They
are models for tests, not production backends.
"""
