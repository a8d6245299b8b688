"""Custom Pallas kernels, each beside a pure-jnp reference of the same function.

Every kernel package has a Mosaic TPU variant, a Triton GPU variant and an XLA path for the CPU, picked by
``impl="auto"`` from the default backend; tests run the kernels with ``interpret=True`` on the CPU against the
references. Packages: ``kv_eviction`` (KV-cache compaction and ragged decode attention over the kept entries),
``block_sparse_attention`` (flash attention over the KV blocks a block table lists, forward and backward: the
kernel of tile-sparse 3D video attention).
"""
