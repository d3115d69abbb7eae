"""llmprod."""
