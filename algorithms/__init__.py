"""One self-contained script per algorithm; importable so tests can check their pieces."""
