//! PostgreSQL connections whose errors carry their SQLSTATE.
//!
//! diesel-async maps eight SQLSTATEs to a `DatabaseErrorKind` and hides every other one behind a
//! private wrapper, so "the server is shutting down" (57P01), "a deadlock was broken" (40P01)
//! and "the disk is full" (53100) all reach us as `Unknown` with a message in the server's
//! `lc_messages` language. We open the socket ourselves and read the server's messages through
//! [`Tap`], which writes the SQLSTATE in front of each error's message text
//! (`SQLSTATE 57P01: terminating connection …`); `error.rs` classifies by that code and never by
//! the words after it. Everything else on the wire passes through untouched.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::AsyncPgConnection;
use socket2::TcpKeepalive;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{
    Config, NoTls, SimpleQueryMessage,
    config::{Host, SslMode, TargetSessionAttrs},
};

/// The prefix the tap writes in front of an error's message; `error.rs` reads it back.
const SQLSTATE_PREFIX: &str = "SQLSTATE ";

/// The SQLSTATE the tap wrote in front of an error's message, if it did.
pub(crate) fn sqlstate(message: &str) -> Option<&str> {
    let code = message.strip_prefix(SQLSTATE_PREFIX)?.get(..5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(code)
}

/// Opens a connection to `url` (TCP or a Unix socket directory, no TLS, as
/// `AsyncPgConnection::establish` does) with its server messages read through a [`Tap`]. Like
/// tokio-postgres's own `connect`, it tries the URL's hosts (or `hostaddr`s) in turn, sets TCP
/// keepalives and `tcp_user_timeout` as the URL says, and honours `target_session_attrs`.
pub(crate) async fn connect(url: &str) -> ConnectionResult<AsyncPgConnection> {
    let config: Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectionError::InvalidConnectionUrl(e.to_string()))?;
    if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
        return Err(ConnectionError::InvalidConnectionUrl(
            "sslmode: TLS to PostgreSQL is not supported; use sslmode=prefer or disable".into(),
        ));
    }
    let mut last = "the URL names no host".to_owned();
    for (host, port) in hosts(&config) {
        match connect_to(&config, &host, port).await {
            Ok(client) => return AsyncPgConnection::try_from(client).await,
            Err(err) => last = err,
        }
    }
    Err(ConnectionError::BadConnection(format!(
        "cannot connect to PostgreSQL: {last}"
    )))
}

/// The URL's hosts with their ports: the `hostaddr`s if it gives them, else the `host`s.
fn hosts(config: &Config) -> Vec<(Host, u16)> {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let addrs = config.get_hostaddrs();
    if addrs.is_empty() {
        let hosts = config.get_hosts().iter().cloned();
        hosts.enumerate().map(|(i, host)| (host, port(i))).collect()
    } else {
        let addrs = addrs.iter().map(|addr| Host::Tcp(addr.to_string()));
        addrs.enumerate().map(|(i, host)| (host, port(i))).collect()
    }
}

/// One host: the socket, the start-up, and the session check; the client, whose connection
/// runs on a task of its own (as tokio-postgres intends) until the client is dropped or the
/// socket closes. A client whose connection has ended is "closed", which the pool checks
/// before handing it out again.
async fn connect_to(
    config: &Config,
    host: &Host,
    port: u16,
) -> Result<tokio_postgres::Client, String> {
    let attempt = open(config, host, port);
    let socket = match config.get_connect_timeout() {
        Some(limit) => tokio::time::timeout(*limit, attempt)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        None => attempt.await,
    };
    let socket = socket.map_err(|e| format!("{host:?} port {port}: {e}"))?;
    let (client, connection) = config
        .connect_raw(Tap::new(socket), NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "PostgreSQL connection ended");
        }
    });
    let wanted = config.get_target_session_attrs();
    if wanted != TargetSessionAttrs::Any {
        let read_only = client
            .simple_query("SHOW transaction_read_only")
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find_map(|message| match message {
                SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "on"),
                _ => None,
            });
        let fits = match wanted {
            TargetSessionAttrs::ReadWrite => read_only == Some(false),
            _ => read_only == Some(true),
        };
        if !fits {
            return Err(format!("{host:?} does not match target_session_attrs"));
        }
    }
    Ok(client)
}

/// A socket of either kind.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Socket for S {}

/// Connects to one host, with the URL's TCP keepalive and user timeout settings.
async fn open(config: &Config, host: &Host, port: u16) -> io::Result<Box<dyn Socket>> {
    Ok(match host {
        Host::Tcp(name) => {
            let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            let socket = socket2::SockRef::from(&stream);
            if config.get_keepalives() {
                let mut keepalive = TcpKeepalive::new().with_time(config.get_keepalives_idle());
                if let Some(interval) = config.get_keepalives_interval() {
                    keepalive = keepalive.with_interval(interval);
                }
                if let Some(retries) = config.get_keepalives_retries() {
                    keepalive = keepalive.with_retries(retries);
                }
                socket.set_tcp_keepalive(&keepalive)?;
            }
            socket.set_tcp_user_timeout(config.get_tcp_user_timeout().copied())?;
            Box::new(stream)
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Box::new(tokio::net::UnixStream::connect(path).await?)
        }
    })
}

/// Where the tap is in the stream of backend messages (a type byte, a 4-byte length that counts
/// itself, then the body).
enum State {
    /// Reading a header; holds the bytes read so far.
    Header(Vec<u8>),
    /// Passing this many more bytes of a message that is not an error through.
    Pass(usize),
    /// Collecting an ErrorResponse: its header and body so far, and the bytes still to come.
    Error(Vec<u8>, usize),
}

/// Reads the server's messages and rewrites each ErrorResponse so that its message field starts
/// with `SQLSTATE XXXXX: `. Writes go through untouched.
pub(crate) struct Tap<S> {
    inner: S,
    state: State,
    /// Bytes ready for the reader.
    out: Vec<u8>,
    /// How much of `out` the reader has taken.
    taken: usize,
    /// The last read from the socket.
    scratch: Box<[u8]>,
}

impl<S> Tap<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            state: State::Header(Vec::with_capacity(5)),
            out: Vec::new(),
            taken: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    /// Appends `bytes` from the server to `out`, rewriting errors once they are whole.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Pass(left) => {
                    let n = (*left).min(bytes.len());
                    self.out.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Header(Vec::with_capacity(5));
                    }
                }
                State::Header(header) => {
                    let n = (5 - header.len()).min(bytes.len());
                    header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if header.len() < 5 {
                        continue;
                    }
                    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    let body = (length as usize).saturating_sub(4);
                    if header[0] == b'E' && body > 0 {
                        self.state = State::Error(std::mem::take(header), body);
                    } else {
                        self.out.extend_from_slice(header);
                        header.clear();
                        if body > 0 {
                            self.state = State::Pass(body);
                        }
                    }
                }
                State::Error(message, left) => {
                    let n = (*left).min(bytes.len());
                    message.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    *left -= n;
                    if *left == 0 {
                        let message = std::mem::take(message);
                        self.out.extend_from_slice(&with_sqlstate(&message));
                        self.state = State::Header(Vec::with_capacity(5));
                    }
                }
            }
        }
    }
}

/// An ErrorResponse (header included) with its `M` field prefixed by its `C` field; returned
/// unchanged if either field is missing or the message is malformed.
fn with_sqlstate(message: &[u8]) -> Vec<u8> {
    let mut fields = Vec::new();
    let mut rest = &message[5..];
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            return message.to_vec();
        };
        fields.push((kind, &tail[..end]));
        rest = &tail[end + 1..];
    }
    let code = fields.iter().find(|(kind, _)| *kind == b'C');
    let Some(&(_, code)) = code.filter(|_| fields.iter().any(|(kind, _)| *kind == b'M')) else {
        return message.to_vec();
    };
    let mut body = Vec::with_capacity(message.len() + SQLSTATE_PREFIX.len() + code.len() + 2);
    for (kind, value) in &fields {
        body.push(*kind);
        if *kind == b'M' {
            body.extend_from_slice(SQLSTATE_PREFIX.as_bytes());
            body.extend_from_slice(code);
            body.extend_from_slice(b": ");
        }
        body.extend_from_slice(value);
        body.push(0);
    }
    body.push(0);
    let length = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut rewritten = Vec::with_capacity(body.len() + 5);
    rewritten.push(b'E');
    rewritten.extend_from_slice(&length.to_be_bytes());
    rewritten.extend_from_slice(&body);
    rewritten
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.taken < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.taken);
                buf.put_slice(&this.out[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.out.len() {
                    this.out.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let filled = read.filled().len();
            if filled == 0 {
                // The end of the stream: clean between messages, not inside one.
                return Poll::Ready(match &this.state {
                    State::Header(header) if header.is_empty() => Ok(()),
                    _ => Err(io::ErrorKind::UnexpectedEof.into()),
                });
            }
            let scratch = std::mem::take(&mut this.scratch);
            this.scan(&scratch[..filled]);
            this.scratch = scratch;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in fields {
            body.push(*kind);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        message(b'E', &body)
    }

    #[test]
    fn errors_get_their_sqlstate_and_everything_else_passes_whatever_the_reads() {
        let shutdown = [
            (b'S', "FATAL"),
            (b'C', "57P01"),
            (b'M', "terminating connection due to administrator command"),
        ];
        let mut stream = message(b'Z', b"I");
        stream.extend(message(b'D', &[7; 300]));
        stream.extend(error(&shutdown));
        stream.extend(message(b'3', b""));
        stream.extend(error(&[(b'S', "ERROR"), (b'M', "no code")]));
        let mut expected = message(b'Z', b"I");
        expected.extend(message(b'D', &[7; 300]));
        expected.extend(error(&[
            (b'S', "FATAL"),
            (b'C', "57P01"),
            (
                b'M',
                "SQLSTATE 57P01: terminating connection due to administrator command",
            ),
        ]));
        expected.extend(message(b'3', b""));
        expected.extend(error(&[(b'S', "ERROR"), (b'M', "no code")]));
        // Every way of cutting the stream into two reads, and one byte at a time.
        for cut in 0..=stream.len() {
            let mut tap = Tap::new(());
            tap.scan(&stream[..cut]);
            tap.scan(&stream[cut..]);
            assert_eq!(tap.out, expected, "cut at {cut}");
        }
        let mut tap = Tap::new(());
        for byte in &stream {
            tap.scan(std::slice::from_ref(byte));
        }
        assert_eq!(tap.out, expected);
    }

    #[test]
    fn a_malformed_error_passes_unchanged() {
        let mut truncated = message(b'E', b"C57P01");
        truncated.push(b'x');
        assert_eq!(with_sqlstate(&truncated), truncated);
    }
}
