//! Who is on the other end of a local connection to the outbound listener, as the kernel
//! says: `SO_PEERCRED` on a unix socket, and for a loopback TCP connection the owner of the
//! peer's socket, found by its address pair in `/proc/net/tcp` (or `tcp6`). A peer that
//! cannot be resolved is refused, never guessed.
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;

/// Why a connection's owner could not be established.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("reading the kernel's socket table: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer's socket is not in the kernel's socket table")]
    NotFound,
}

/// The effective uid of this process (the owner of `/proc/self`).
pub fn own_uid() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// The uid owning the client end of the TCP connection `local` (ours) ↔ `remote` (theirs).
pub fn tcp_peer_uid(local: SocketAddr, remote: SocketAddr) -> Result<u32, PeerError> {
    let table = match remote.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table)?;
    find_owner(&text, local, remote).ok_or(PeerError::NotFound)
}

/// The uid of the socket whose local address is `remote` and whose remote address is
/// `local`, in a `/proc/net/tcp{,6}` table.
pub(crate) fn find_owner(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let want_local = proc_addr(remote);
    let want_remote = proc_addr(local);
    table.lines().skip(1).find_map(|line| {
        let mut f = line.split_whitespace();
        let (_sl, l, r) = (f.next()?, f.next()?, f.next()?);
        if !l.eq_ignore_ascii_case(&want_local) || !r.eq_ignore_ascii_case(&want_remote) {
            return None;
        }
        // st, tx:rx, tr:when, retrnsmt, uid
        f.nth(4)?.parse().ok()
    })
}

/// An address as the kernel prints it there: each 32-bit word of the IP in host byte order,
/// in hex, then `:` and the port in hex.
fn proc_addr(a: SocketAddr) -> String {
    let ip = match a.ip() {
        IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => v6
            .octets()
            .chunks_exact(4)
            .map(|w| {
                let word = [
                    w.first().copied().unwrap_or(0),
                    w.get(1).copied().unwrap_or(0),
                    w.get(2).copied().unwrap_or(0),
                    w.get(3).copied().unwrap_or(0),
                ];
                format!("{:08X}", u32::from_ne_bytes(word))
            })
            .collect(),
    };
    format!("{ip}:{:04X}", a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_the_kernel_prints_them() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                proc_addr("127.0.0.1:8080".parse().unwrap()),
                "0100007F:1F90"
            );
            assert_eq!(
                proc_addr("[::1]:443".parse().unwrap()),
                "00000000000000000000000001000000:01BB"
            );
        }
    }

    #[test]
    fn the_owner_is_the_socket_with_the_mirrored_address_pair() {
        let ours: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let theirs: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let (o, t) = (proc_addr(ours), proc_addr(theirs));
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {o} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
             1: {o} {t} 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
             2: {t} {o} 01 00000000:00000000 00:00000000 00000000  1000        0 3 1\n"
        );
        assert_eq!(find_owner(&table, ours, theirs), Some(1000));
        // Our own end, or another pair, is not the peer.
        let other: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(find_owner(&table, ours, other), None);
        assert_eq!(find_owner("", ours, theirs), None);
        let garbage = format!("h\n0: {t} {o} 01 x y z nope\n");
        assert_eq!(find_owner(&garbage, ours, theirs), None);
    }

    #[test]
    fn a_real_loopback_connection_resolves_to_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, remote) = l.accept().unwrap();
        assert_eq!(remote, c.local_addr().unwrap());
        assert_eq!(
            tcp_peer_uid(s.local_addr().unwrap(), remote).unwrap(),
            own_uid().unwrap()
        );
    }
}
