//! Shared fixtures for the podnet benches.
