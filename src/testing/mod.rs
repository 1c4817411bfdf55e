//! Test helpers. `tree.rs` is also the integration tests' `tree` module (included by path), so
//! both suites compare trees with one oracle; it uses only std and the crate's dependencies.

pub(crate) mod tree;
mod tree_tests;
