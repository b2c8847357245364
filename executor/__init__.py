"""Real decoding engine: models, KV placement, KV policies, per-phase timing, trace recording."""
