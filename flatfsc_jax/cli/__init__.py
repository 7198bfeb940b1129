"""Command-line front doors of flatfsc_jax (absl flags); the logic lives in the library modules."""
