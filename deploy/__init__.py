"""SLM-Fed deploy package."""
