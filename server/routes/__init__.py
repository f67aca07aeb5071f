"""HTTP and WebSocket routes, one router per file."""
