//! The container's filesystem changes, as a sorted stream of tar entries (owned by the diff helper).
