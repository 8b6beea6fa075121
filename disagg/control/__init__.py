"""Router ↔ node control plane: message types and their msgpack codec."""
