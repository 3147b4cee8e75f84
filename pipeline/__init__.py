"""Tasks, expert loading, pooling and extraction (`musk extract`)."""
