//! Boot side (see the boot issue).
