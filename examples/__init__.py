"""The built-in demo: generated images served on 127.0.0.1 and the demo manifest."""
