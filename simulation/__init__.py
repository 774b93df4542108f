"""SLM-Fed simulation package."""
