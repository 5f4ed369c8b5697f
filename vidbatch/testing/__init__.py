"""Fixtures for tests and demos; the library never imports this package."""
