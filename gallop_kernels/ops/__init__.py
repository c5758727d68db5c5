"""The two ops the optimizer needs, one folder each (`docs/design.md#layers`).

* `ops.select.select`: the exact top-k of a group's scores (``ops/select/``);
* `ops.adamw.sparse_adamw`: one AdamW step on the selected entries (``ops/adamw/``).

Each folder holds the op's pure-torch oracle (``naive.py``), its torch backend and its Triton
kernels with their launcher; ``ops/backends.py`` chooses the backend, ``ops/_triton/`` holds what
the Triton launchers share (launch descriptions and tables, the compile gate), and
``ops/collective.py`` the cross-rank layout of a sharded selection. Triton is imported lazily, so
the torch backend works where it is not installed. (Nothing is re-exported here, so that
``ops.select`` stays the op's package: ``from gallop_kernels.ops.select import select``.)
"""
