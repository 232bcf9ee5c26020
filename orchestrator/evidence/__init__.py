"""What decides which candidate wins: protected paths, held-out tests, selection."""
