"""Circuit discovery: edges as data, edge patching, edge attribution patching."""
