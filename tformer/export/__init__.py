"""Exports of a TransformerLM to portable artifacts, each validated against PyTorch."""
