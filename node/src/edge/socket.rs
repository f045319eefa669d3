//! A device link's TCP socket, which can move from the runtime that did its TLS handshake to the one that
//! runs its session (`runtime::HandshakeRuntime`) without touching the TLS state layered over it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Always holds a stream, except for the instant inside `move_to`; reads and writes then fail.
pub struct Socket(Option<TcpStream>);

fn moving() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the socket is being moved between runtimes")
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Socket(Some(tcp))
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.as_ref().ok_or_else(moving)?.peer_addr()
    }

    /// Registers the socket with `runtime`'s I/O driver instead of the current one's, so that its readiness
    /// wakes tasks there. Bytes the kernel holds for it stay there (the new registration reports them), and
    /// nothing above the socket (TLS, framing) sees the move.
    pub fn move_to(&mut self, runtime: &tokio::runtime::Handle) -> io::Result<()> {
        let tcp = self.0.take().ok_or_else(moving)?.into_std()?;
        let _entered = runtime.enter();
        self.0 = Some(TcpStream::from_std(tcp)?);
        Ok(())
    }

    fn stream(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        self.get_mut().0.as_mut().map(Pin::new).ok_or_else(moving)
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::Socket;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes that arrived before the move are read after it, on the other runtime, once the first runtime
    /// (whose driver the socket was registered with) is gone; and writes work from there.
    #[test]
    fn a_moved_socket_keeps_its_bytes_and_works_on_the_new_runtime() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let second = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut socket = {
            let _entered = first.enter();
            Socket::new(tokio::net::TcpStream::from_std(tcp).unwrap())
        };
        peer.write_all(b"before").unwrap();
        let mut got = [0; 3];
        first.block_on(socket.read_exact(&mut got)).unwrap();
        assert_eq!(&got, b"bef");

        socket.move_to(second.handle()).unwrap();
        drop(first);
        peer.write_all(b" after").unwrap();
        let got = second.block_on(async move {
            let mut got = [0; 9];
            socket.read_exact(&mut got).await.unwrap();
            socket.write_all(b"answer").await.unwrap();
            got
        });
        assert_eq!(&got, b"ore after");
        let mut answer = [0; 6];
        peer.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"answer");
    }
}
