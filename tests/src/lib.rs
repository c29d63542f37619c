//! Fixtures for mxlb integration tests.
