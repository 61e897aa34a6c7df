"""The outputs: videos, results, the dataset files, the report, and the folder that holds them."""
