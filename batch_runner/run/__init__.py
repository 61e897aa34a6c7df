"""The run: command line, one process's loop, start-up and stopping, and what it checks first."""
