//! SSNTP protocol crate (built in a later issue; see ARCHITECTURE.md → SSNTP).
