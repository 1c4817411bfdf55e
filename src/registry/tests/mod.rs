//! Integration tests of the registry client (see submodules).
