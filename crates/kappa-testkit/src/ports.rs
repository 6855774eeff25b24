//! Free TCP ports on 127.0.0.1, for the HTTP listeners of services and for servers a run
//! starts itself.

/// A TCP port on 127.0.0.1 that was free a moment ago (the listener that found it is closed,
/// so another process may take it first; good enough for tests and benchmarks on one host).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
