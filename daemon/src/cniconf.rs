//! The node CNI config writer (written for issue 4).
