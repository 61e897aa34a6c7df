"""batch_runner: offline image-to-video generation at dataset scale."""
