"""The zeroplane command line (Click)."""
