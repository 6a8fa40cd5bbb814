"""The `csm-mlx` command."""
