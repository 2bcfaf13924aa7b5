//! Boot-storm harnesses.
