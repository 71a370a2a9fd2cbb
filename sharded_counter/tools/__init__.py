"""The ``sharded-counter`` command, its demo and its benchmarks: a layer on top.

The library never imports anything from here, so ``import sharded_counter``
works without the command's own dependencies.

May import: anything of the library.
"""
