"""mvdream-platform."""
