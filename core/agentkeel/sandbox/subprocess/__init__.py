"""sandbox/subprocess."""
