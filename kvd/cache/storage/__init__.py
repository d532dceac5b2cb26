"""KV storage pools: where a prefill instance leaves a request's blocks for a decode instance."""
