"""SLM-Fed client package."""
