//! A minimal HTTP/1.1 client over real TCP from inside a namespace, for the
//! end-to-end tests that need what curl cannot give: a fixed client port reused at
//! once (closed by RST, so no TIME_WAIT), and keep-alive connections held open
//! across changes to the balancer.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use crate::netns::Netns;

/// Per-operation timeout: a request through the lab takes about a millisecond.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a TCP connection from inside `ns`, from `local_port` if given.
pub fn connect(ns: &Netns, to: SocketAddrV4, local_port: Option<u16>) -> io::Result<TcpStream> {
    let from = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, local_port.unwrap_or(0));
    connect_from(ns, from, to, TIMEOUT)
}

/// Opens a TCP connection from inside `ns`, from a given address and port (0: any),
/// giving up after `timeout`.
pub fn connect_from(
    ns: &Netns,
    from: SocketAddrV4,
    to: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // A socket belongs to the namespace it was created in, whichever thread uses it.
    let _inside = ns.enter();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Close with RST: the same port can be used again at once.
    socket.set_linger(Some(Duration::ZERO))?;
    if from != SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0) {
        socket.bind(&SocketAddr::V4(from).into())?;
    }
    socket.connect_timeout(&SocketAddr::V4(to).into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Sends `GET /` on a keep-alive connection and returns the body, trimmed (the
/// lab's web servers answer with their name).
pub fn get(stream: &mut TcpStream) -> io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: foobar.com\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| io::Error::other(format!("no Content-Length in {head:?}")))?;
            if body.len() >= length {
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(io::Error::other(format!("answer {head:?}")));
                }
                return Ok(body[..length].trim().to_owned());
            }
        }
    }
}

/// One request on a new connection, which is then reset.
pub fn get_once(ns: &Netns, to: SocketAddrV4, local_port: Option<u16>) -> io::Result<String> {
    let mut stream = connect(ns, to, local_port)?;
    get(&mut stream)
}
