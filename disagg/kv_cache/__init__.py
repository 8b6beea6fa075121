"""KV cache bookkeeping: block hashing (``hashing``) and the reference-counted
block pool (``block_pool``); import each name from its module."""
