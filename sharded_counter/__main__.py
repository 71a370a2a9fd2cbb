"""``python -m sharded_counter``: the same as the ``sharded-counter`` command."""

from .tools.launch import main

if __name__ == "__main__":
    main(prog_name="sharded-counter")
