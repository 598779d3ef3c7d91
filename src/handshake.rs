//! HTTP/1.1 WebSocket upgrade: incremental head reading, validation, header rewriting.
