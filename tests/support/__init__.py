"""Test support: real server processes and waiting on conditions with a deadline."""
