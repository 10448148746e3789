"""The command line: argument handling, input checks, signals, exit statuses and output."""
