"""Data: sources -> item table; splits; transforms; dataset; samplers."""
