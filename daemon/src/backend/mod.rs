//! Backends: how this node reaches the other nodes' pods (written for issue 4).
