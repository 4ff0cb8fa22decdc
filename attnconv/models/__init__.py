"""attnconv's own model classes (registered with transformers' Auto classes on import)."""
