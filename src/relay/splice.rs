//! Bulk bytes between two plain TCP sockets with `splice(2)`: from one socket into a pipe
//! and from the pipe into the other, kernel to kernel, never copied into the process.
//!
//! The relay uses it for a direction that moves bulk data when neither stream adds
//! anything to the bytes (no TLS, sealing, compression or shaping): see
//! [`Spliceable`]. Small messages stay on the relay's buffers, where one read and one
//! write cost fewer system calls than two splices and a header.

use tokio::net::TcpStream;

/// A stream whose bytes the relay may move past it, socket to socket.
pub trait Spliceable {
    /// The plain TCP socket under this stream when its bytes may bypass the stream's own
    /// reads and writes (nothing is added, removed or held back in between).
    fn socket(&self) -> Option<&TcpStream> {
        None
    }

    /// Whether, for now, bytes must pass the stream's own reads and writes (a speed limit).
    fn shaped(&self) -> bool {
        false
    }

    /// Counts bytes that bypassed the stream: `read` taken from its socket, `written`
    /// given to it.
    fn count_spliced(&self, _read: usize, _written: usize) {}
}

impl Spliceable for TcpStream {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<T: Spliceable + ?Sized> Spliceable for Box<T> {
    fn socket(&self) -> Option<&TcpStream> {
        (**self).socket()
    }

    fn shaped(&self) -> bool {
        (**self).shaped()
    }

    fn count_spliced(&self, read: usize, written: usize) {
        (**self).count_spliced(read, written)
    }
}

impl<T: Spliceable + ?Sized> Spliceable for &mut T {
    fn socket(&self) -> Option<&TcpStream> {
        (**self).socket()
    }

    fn shaped(&self) -> bool {
        (**self).shaped()
    }

    fn count_spliced(&self, read: usize, written: usize) {
        (**self).count_spliced(read, written)
    }
}

impl Spliceable for tokio::io::DuplexStream {}

impl<R, W> Spliceable for tokio::io::Join<R, W> {}

/// How many bytes a pipe is asked to hold: the largest chunk a spliced direction sends.
pub(crate) const PIPE_SIZE: usize = 256 * 1024;

/// A pipe between two sockets, and how many bytes it holds.
pub(crate) struct Pipe {
    #[cfg(target_os = "linux")]
    read: std::os::fd::OwnedFd,
    #[cfg(target_os = "linux")]
    write: std::os::fd::OwnedFd,
    /// Bytes in the pipe, not yet spliced out.
    pub(crate) held: usize,
}

impl Pipe {
    /// A pipe, or `None` where pipes cannot be had (the relay then keeps copying).
    pub(crate) fn open() -> Option<Pipe> {
        match Pipe::new() {
            Ok(pipe) => Some(pipe),
            Err(err) => {
                tracing::debug!(%err, "no pipe for splice; copying instead");
                None
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::AsRawFd;
    use std::task::{ready, Context, Poll};

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use nix::sys::socket::{send, MsgFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Pipe, PIPE_SIZE};

    const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

    /// Runs `op` on `socket` once it is ready for `interest`, until it does not block.
    fn poll_io<T>(
        cx: &mut Context<'_>,
        socket: &TcpStream,
        interest: Interest,
        mut op: impl FnMut() -> nix::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            if interest.is_readable() {
                ready!(socket.poll_read_ready(cx))?;
            } else {
                ready!(socket.poll_write_ready(cx))?;
            }
            match socket.try_io(interest, || op().map_err(io::Error::from)) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            // A bigger pipe sends bigger chunks; if refused, the kernel's 64 KiB stays.
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
            Ok(Pipe { read, write, held: 0 })
        }

        /// Moves up to `max` bytes from `from` into the pipe: how many, 0 at the socket's end.
        pub(crate) fn fill(
            &mut self,
            cx: &mut Context<'_>,
            from: &TcpStream,
            max: usize,
        ) -> Poll<io::Result<usize>> {
            let write = &self.write;
            let n = ready!(poll_io(cx, from, Interest::READABLE, || splice(
                from, None, write, None, max, FLAGS
            )))?;
            self.held += n;
            Poll::Ready(Ok(n))
        }

        /// Moves bytes the pipe holds into `to`, as many as the socket takes at once.
        pub(crate) fn drain(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<usize>> {
            let (read, held) = (&self.read, self.held);
            let n =
                ready!(poll_io(cx, to, Interest::WRITABLE, || splice(read, None, to, None, held, FLAGS)))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held -= n;
            Poll::Ready(Ok(n))
        }
    }

    /// Sends `bytes` (a chunk's header) straight to `to`; with `more`, the kernel holds
    /// them for the payload that follows at once, so both leave in one segment.
    pub(crate) fn send_raw(
        cx: &mut Context<'_>,
        to: &TcpStream,
        bytes: &[u8],
        more: bool,
    ) -> Poll<io::Result<usize>> {
        let more = if more { MsgFlags::from_bits_retain(libc::MSG_MORE) } else { MsgFlags::empty() };
        let flags = more | MsgFlags::MSG_NOSIGNAL;
        poll_io(cx, to, Interest::WRITABLE, || send(to.as_raw_fd(), bytes, flags))
    }
}

#[cfg(target_os = "linux")]
pub(crate) use linux::send_raw;

/// Elsewhere there are no pipes to splice through: [`Pipe::open`] gives `None`.
#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::io;
    use std::task::{Context, Poll};

    use tokio::net::TcpStream;

    use super::Pipe;

    fn unsupported<T>() -> Poll<io::Result<T>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            Err(io::ErrorKind::Unsupported.into())
        }

        pub(crate) fn fill(
            &mut self,
            _: &mut Context<'_>,
            _: &TcpStream,
            _: usize,
        ) -> Poll<io::Result<usize>> {
            unsupported()
        }

        pub(crate) fn drain(&mut self, _: &mut Context<'_>, _: &TcpStream) -> Poll<io::Result<usize>> {
            unsupported()
        }
    }

    pub(crate) fn send_raw(_: &mut Context<'_>, _: &TcpStream, _: &[u8], _: bool) -> Poll<io::Result<usize>> {
        unsupported()
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) use elsewhere::send_raw;
