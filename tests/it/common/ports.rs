//! Free loopback ports for the servers the tests start.

/// A port nothing listens on now (the kernel's pick for port 0, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
