"""A deterministic simulation of the whole protocol (issue 29): the counter's own steps,
many logical processes interleaved in virtual time, against models of Datastore
and memcached (``sharded_counter/memory``), with faults drawn from a seed.

* ``clock.py``: virtual time and seeded draws, in force for one history;
* ``scheduler.py``: the third shell, which drives steps as events;
* ``world.py``: the models, the processes and the faults;
* ``run.py``: the operations of one history, and its end;
* ``invariants.py``: what is checked after every event;
* ``history.py``: what the callers heard, checked against the total;
* ``__main__.py``: the search, ``python -m sharded_counter.tools.simulate``.
"""
