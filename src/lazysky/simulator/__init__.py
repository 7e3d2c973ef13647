"""Survey simulator (work in progress)."""
