"""The cluster: processes, who makes which row, replicas of several GPUs, and which GPU each sees."""
