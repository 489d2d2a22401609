"""Data helpers: reading the three source formats, labels, the demo set, the decoded array and picking rows."""
