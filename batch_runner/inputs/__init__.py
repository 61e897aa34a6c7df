"""The inputs: the manifest read and validated, and its images."""
