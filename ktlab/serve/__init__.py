"""Serving: continuous batching engine, paged KV cache, OpenAI-compatible API, bench client."""
