"""Built-in attention implementations; each module registers its kernels on import."""
