//! AF_XDP sockets for quicklane's VM fast path.
//!
//! Today: opening an AF_XDP socket, which is also how the agent probes that the kernel has
//! them (`CONFIG_XDP_SOCKETS`). UMEM, rings and queue binding come with the VM fast path.
use std::os::fd::{AsFd, BorrowedFd, FromRawFd as _, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("this kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS): {0}")]
    Unsupported(std::io::Error),
    #[error("creating an AF_XDP socket failed: {0}; it needs CAP_NET_RAW")]
    Create(std::io::Error),
}

/// An unbound AF_XDP socket.
#[derive(Debug)]
pub struct XskSocket {
    fd: OwnedFd,
}

impl XskSocket {
    pub fn open() -> Result<Self, XskError> {
        // SAFETY: plain socket(2); the returned descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EAFNOSUPPORT) => XskError::Unsupported(err),
                _ => XskError::Create(err),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

impl AsFd for XskSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn opens_an_af_xdp_socket_or_says_why_not() {
        match XskSocket::open() {
            Ok(sock) => {
                let mut domain: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: getsockopt into a correctly sized local.
                let rc = unsafe {
                    libc::getsockopt(
                        sock.as_fd().as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_DOMAIN,
                        std::ptr::from_mut(&mut domain).cast(),
                        &raw mut len,
                    )
                };
                assert_eq!(rc, 0);
                assert_eq!(domain, libc::AF_XDP);
            }
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true") && !nix_is_root(),
                    "AF_XDP socket refused as root: {e}"
                );
                eprintln!("skipping: {e}");
            }
        }
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}
