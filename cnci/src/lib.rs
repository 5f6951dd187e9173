//! Concentrator dataplane (built in a later issue; see ARCHITECTURE.md → Concentrator).
