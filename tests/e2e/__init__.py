"""End-to-end: the image and the compose stack on a real Docker engine."""
