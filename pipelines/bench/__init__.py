"""`tokenmill bench <kind>`: one module per benchmark, each side in a child process of its own."""
