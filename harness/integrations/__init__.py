"""Where the harness plugs into other tools: transformers (attention backends)."""
