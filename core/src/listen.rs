//! Binding a process's listening ports, with an error that says which port failed and where: node and
//! gateway both bind several, and "address in use" alone does not tell an operator which flag to change.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// A port that could not be bound, or whose bound address could not be read.
#[derive(Debug, thiserror::Error)]
#[error("binding {what} on {addr}: {source}")]
pub struct BindError {
    /// What the port is for ("the device port", "the metrics port", …).
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` for `what`; returns the listener and the address it is bound to (the port the OS chose
/// when `addr` asks for port 0).
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| BindError { what, addr, source })?;
    let bound = listener.local_addr().map_err(|source| BindError { what, addr, source })?;
    Ok((listener, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn port_zero_reports_the_port_chosen_and_a_taken_port_names_what_it_was_for() {
        let (_held, bound) = bind("the device port", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_ne!(bound.port(), 0);
        let error = bind("the metrics port", bound).await.expect_err("the port is taken");
        assert_eq!(error.addr, bound);
        assert!(error.to_string().starts_with(&format!("binding the metrics port on {bound}: ")), "{error}");
    }
}
