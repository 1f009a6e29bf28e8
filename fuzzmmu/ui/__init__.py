"""Human-facing rendering and input formats for the command line."""
