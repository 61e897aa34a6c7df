"""The model replica: the pipeline built, planned into memory, placed, shared and sped up."""
