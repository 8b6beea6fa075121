"""Conditional router (to be built): tokenises, hashes prompt blocks with
:func:`disagg.kv_cache.hash_blocks` (the same chained hashes the engines
use), and decides per request between local and remote prefill."""
