"""Speculative decoding inside the continuous-batching engine.

* :mod:`.ngram`: prompt-lookup proposals (pure Python).
* :mod:`.draft`: a draft model with its own paged KV cache over the target's page ids.
* :mod:`.rejection`: on-device rejection sampling (exact target distribution).
* :mod:`.verify`: packing and running the target's verify step (``q_len = k + 1`` per sequence).
* :mod:`.decoder`: what the engine calls each step.
* :mod:`.params`: per-request ``num_speculative_tokens`` validation (pure Python).
"""
