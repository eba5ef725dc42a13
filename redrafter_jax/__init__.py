"""ReDrafter speculative decoding in JAX."""
