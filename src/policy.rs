//! Backend selection policies.
