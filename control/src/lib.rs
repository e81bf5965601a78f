//! The podnet control service and its client library.
