"""The sync shell: each path of a ``Counter`` run against ``store`` and ``cache``.

The core decides; these modules do the calls in order: the backends a counter
talks to (``backend.py``), which shard a write goes to (``picker.py``), group
commit (``combiner.py``), and housekeeping (``maintenance.py``).

May import: ``core``, ``store``, ``cache``, ``errors``, ``settings``. Never
``patterns`` or ``tools``.
"""
