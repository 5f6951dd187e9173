//! Compute-node dataplane (built in a later issue; see ARCHITECTURE.md → Compute node).
