"""`productvlm serve`: an OpenAI-compatible HTTP API with dynamic batching, a catalog endpoint and a page."""
