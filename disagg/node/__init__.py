"""What every node process shares: the serving loop and its launch flags.

The roles themselves live in ``prefill_node/`` and ``decode_node/``.
"""
