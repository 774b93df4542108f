"""SLM-Fed server package."""
