//! Tests of the diff stage against real overlay mounts.
