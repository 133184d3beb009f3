"""slimgpt."""
