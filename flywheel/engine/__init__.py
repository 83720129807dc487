"""The generation engine: paged KV cache, continuous batching, prefix caching, native models."""
