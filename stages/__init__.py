"""Pipeline stages: pure batch transforms with no Ray inside."""
