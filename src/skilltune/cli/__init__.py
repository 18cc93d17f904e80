"""Command-line interface: one module per command group; only this layer prints and exits."""
