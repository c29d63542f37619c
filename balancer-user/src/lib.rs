//! mxlb placeholder
