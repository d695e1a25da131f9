"""Models from a hub (Hugging Face): names (`names`), what the hub says before a download
(`remote`), the cache (`cache`), resolving a name to the cache or the hub (`resolve`), and the
downloads (`download`). Imported by the gateway's services; no engine, no FastAPI."""
