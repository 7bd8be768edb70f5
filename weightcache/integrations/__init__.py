"""Adapters that let serving engines load through weightcache.

Each module here is the only importer of its engine, imports it lazily (inside
the function that needs it), and keeps the decisions it makes (options,
device, which tensors) in plain functions that run without the engine:

* :mod:`weightcache.integrations.vllm`: a vLLM model loader, registered as
  ``--load-format weightcache`` through the ``vllm.general_plugins`` entry point.
"""
