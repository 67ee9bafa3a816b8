//! The management service (being written).
