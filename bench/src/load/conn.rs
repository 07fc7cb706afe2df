//! The two transports the load generator speaks: TCP, the path quicklane accelerates, and
//! AF_UNIX stream sockets, the kernel's cheapest same-host stream, measured as the reference
//! a socket-level bypass can at best approach (it still pays the same syscalls, copies and
//! wakeups, and saves only the protocol path).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const UNIX_PREFIX: &str = "unix:";

/// Where a server listens or a client connects: `ADDR:PORT`, or `unix:PATH`. An unnamed
/// AF_UNIX socket (a client's end) is `unix:` with an empty path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    /// The address of a named endpoint, for command-line flags: an empty unix path names no
    /// socket.
    pub fn parse_named(s: &str) -> Result<Self, String> {
        match s.parse()? {
            Self::Unix(path) if path.as_os_str().is_empty() => {
                Err(format!("{s:?} names no socket: expected unix:PATH"))
            }
            endpoint => Ok(endpoint),
        }
    }

    #[must_use]
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(addr) => Some(*addr),
            Self::Unix(_) => None,
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self::Tcp(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix(UNIX_PREFIX) {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|e| format!("{s:?} is neither ADDR:PORT nor unix:PATH: {e}"))
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One connected stream of either transport.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Connects, bounding a TCP attempt by `timeout` (an AF_UNIX connect never waits for a
    /// peer: it succeeds or fails at once).
    pub fn connect(peer: &Endpoint, timeout: Duration) -> io::Result<Self> {
        match peer {
            Endpoint::Tcp(addr) => TcpStream::connect_timeout(addr, timeout).map(Self::Tcp),
            Endpoint::Unix(path) => UnixStream::connect(path).map(Self::Unix),
        }
    }

    pub fn local(&self) -> io::Result<Endpoint> {
        match self {
            Self::Tcp(s) => s.local_addr().map(Endpoint::Tcp),
            Self::Unix(s) => Ok(unix_endpoint(s.local_addr()?.as_pathname())),
        }
    }

    /// Nagle's algorithm is TCP's; AF_UNIX sends every write at once anyway.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nodelay(nodelay),
            Self::Unix(_) => Ok(()),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(timeout),
            Self::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(timeout),
            Self::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(nonblocking),
            Self::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// A second handle on the same socket, e.g. for a reader thread beside the writer.
    pub fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
            Self::Unix(s) => s.try_clone().map(Self::Unix),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A listening socket of either transport. An AF_UNIX listener removes its socket file when
/// dropped, so a finished server leaves nothing behind and the next one can bind the path.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds; an AF_UNIX path that already exists is refused by the kernel (EADDRINUSE), not
    /// removed: it may be another server's.
    pub fn bind(at: &Endpoint) -> io::Result<Self> {
        match at {
            Endpoint::Tcp(addr) => TcpListener::bind(addr).map(Self::Tcp),
            Endpoint::Unix(path) => UnixListener::bind(path).map(|l| Self::Unix(l, path.clone())),
        }
    }

    pub fn local(&self) -> io::Result<Endpoint> {
        match self {
            Self::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Self::Unix(_, path) => Ok(Endpoint::Unix(path.clone())),
        }
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.set_nonblocking(nonblocking),
            Self::Unix(l, _) => l.set_nonblocking(nonblocking),
        }
    }

    pub fn accept(&self) -> io::Result<(Conn, Endpoint)> {
        match self {
            Self::Tcp(l) => l.accept().map(|(s, peer)| (Conn::Tcp(s), peer.into())),
            Self::Unix(l, _) => l
                .accept()
                .map(|(s, peer)| (Conn::Unix(s), unix_endpoint(peer.as_pathname()))),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn unix_endpoint(path: Option<&Path>) -> Endpoint {
    Endpoint::Unix(path.map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_through_text_and_json() {
        for text in ["127.0.0.1:5001", "[::1]:80", "unix:/run/x.sock", "unix:"] {
            let endpoint: Endpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), text);
            let json = serde_json::to_string(&endpoint).unwrap();
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), endpoint);
        }
        assert_eq!(
            "unix:/a".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/a".into())
        );
    }

    #[test]
    fn flags_must_name_a_socket() {
        assert!(Endpoint::parse_named("unix:/run/x.sock").is_ok());
        assert!(Endpoint::parse_named("10.0.0.1:5").is_ok());
        for bad in ["unix:", "localhost:1", "10.0.0.1", "/run/x.sock", ""] {
            assert!(Endpoint::parse_named(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_unix_listener_serves_and_removes_its_file() {
        let dir = std::env::temp_dir().join(format!("ql-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at = Endpoint::Unix(dir.join("s.sock"));
        let listener = Listener::bind(&at).unwrap();
        assert_eq!(listener.local().unwrap(), at);
        assert!(
            Listener::bind(&at).is_err(),
            "a second server took the path"
        );
        let mut client = Conn::connect(&at, Duration::from_secs(1)).unwrap();
        let (mut served, peer) = listener.accept().unwrap();
        assert_eq!(peer, Endpoint::Unix(PathBuf::new()));
        assert_eq!(client.local().unwrap(), Endpoint::Unix(PathBuf::new()));
        client.write_all(b"ping").unwrap();
        let mut got = [0; 4];
        served.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        drop(listener);
        assert!(!dir.join("s.sock").exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
