//! The OCI distribution client (owned by the registry helper).
