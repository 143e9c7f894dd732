"""The `ctformat` command line: a thin layer of click + rich over the ctformat library."""
