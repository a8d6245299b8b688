"""Efficiency methods, one subpackage or module per paper. Each is a ``jaxeff.models.hooks.Method`` applied with
``model.with_methods(...)``; see ``docs/DESIGN.md`` for the hooks they wrap.

* ``kv_eviction``: the KV-eviction policy framework and the training-free baselines (StreamingLLM, H2O, SnapKV,
  recent-only and random controls).
"""
