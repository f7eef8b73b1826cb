"""Serving registered models over HTTP with Ray Serve: options, payloads, the app."""
