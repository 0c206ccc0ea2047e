//! BIRD's control socket: a Unix stream speaking lines of text. Each reply line
//! starts with a four-digit code, then `-` when more lines follow or a space on the
//! last one; a line starting with a space continues the previous code, and one
//! starting with `+` is a spontaneous message. Codes 0xxx mean done, 1xxx are table
//! rows, 2xxx headings, 8xxx run-time errors and 9xxx parse errors (BIRD's
//! `doc/reply_codes`). A connection opens with `0001 BIRD <version> ready.`

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// One line of a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Its code (a continuation line takes the code before it).
    pub code: u16,
    /// The text after the code.
    pub text: String,
}

/// A whole reply; the last line is the final one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Every line, in order.
    pub lines: Vec<Line>,
}

impl Reply {
    /// The code of the final line.
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(0, |l| l.code)
    }

    /// Whether BIRD refused the command (a run-time or parse error).
    pub fn is_error(&self) -> bool {
        self.code() >= 8000
    }

    /// The text of every line, one per line, for messages.
    pub fn text(&self) -> String {
        let lines: Vec<&str> = self
            .lines
            .iter()
            .map(|l| l.text.trim())
            .filter(|t| !t.is_empty())
            .collect();
        lines.join("; ")
    }
}

/// Why talking to BIRD failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached or broke.
    #[error("BIRD's control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// No whole reply in time.
    #[error("BIRD's control socket {path}: no answer within {limit:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long we waited.
        limit: Duration,
    },
    /// A line that is not BIRD's protocol.
    #[error("BIRD's control socket: unexpected line {0:?}")]
    Protocol(String),
    /// BIRD answered with an error.
    #[error("BIRD refused `{command}`: {code} {message}")]
    Refused {
        /// The command.
        command: String,
        /// The final code (8xxx or 9xxx).
        code: u16,
        /// BIRD's words.
        message: String,
    },
}

/// Reads reply lines and says when a reply is whole.
#[derive(Debug, Default)]
pub struct ReplyReader {
    lines: Vec<Line>,
    last_code: u16,
}

impl ReplyReader {
    /// Takes one line (without its newline); returns the reply once its final line
    /// came. Spontaneous messages are skipped.
    pub fn push(&mut self, raw: &str) -> Result<Option<Reply>, ControlError> {
        if raw.starts_with('+') {
            return Ok(None);
        }
        if let Some(text) = raw.strip_prefix(' ') {
            self.lines.push(Line {
                code: self.last_code,
                text: text.to_owned(),
            });
            return Ok(None);
        }
        let bytes = raw.as_bytes();
        let code = raw
            .get(..4)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse::<u16>().ok());
        let (Some(code), Some(&mark)) = (code, bytes.get(4)) else {
            // A final line whose text is empty may lose its trailing space on the way.
            return match code {
                Some(code) if raw.len() == 4 => Ok(Some(self.finish(code, String::new()))),
                _ => Err(ControlError::Protocol(raw.to_owned())),
            };
        };
        let text = raw.get(5..).unwrap_or("").to_owned();
        match mark {
            b'-' => {
                self.last_code = code;
                self.lines.push(Line { code, text });
                Ok(None)
            }
            b' ' => Ok(Some(self.finish(code, text))),
            _ => Err(ControlError::Protocol(raw.to_owned())),
        }
    }

    fn finish(&mut self, code: u16, text: String) -> Reply {
        self.lines.push(Line { code, text });
        self.last_code = 0;
        Reply {
            lines: std::mem::take(&mut self.lines),
        }
    }
}

/// Sends one command on a fresh connection and returns BIRD's reply; an error reply
/// (8xxx, 9xxx) is [`ControlError::Refused`].
pub async fn command(socket: &Path, command: &str, limit: Duration) -> Result<Reply, ControlError> {
    let exchange = async {
        let io = |source| ControlError::Io {
            path: socket.to_owned(),
            source,
        };
        let stream = UnixStream::connect(socket).await.map_err(io)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut reader = ReplyReader::default();
        // The greeting first.
        read_reply(&mut lines, &mut reader, socket).await?;
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        read_reply(&mut lines, &mut reader, socket).await
    };
    let reply =
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ControlError::Timeout {
                path: socket.to_owned(),
                limit,
            })??;
    if reply.is_error() {
        return Err(ControlError::Refused {
            command: command.to_owned(),
            code: reply.code(),
            message: reply.text(),
        });
    }
    Ok(reply)
}

/// Whether BIRD answers on `socket` (its greeting), within `limit`.
pub async fn answers(socket: &Path, limit: Duration) -> bool {
    let greeting = async {
        let stream = UnixStream::connect(socket).await.ok()?;
        let mut lines = BufReader::new(stream).lines();
        let mut reader = ReplyReader::default();
        read_reply(&mut lines, &mut reader, socket).await.ok()
    };
    matches!(
        tokio::time::timeout(limit, greeting).await,
        Ok(Some(reply)) if reply.code() == 1
    )
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
    reader: &mut ReplyReader,
    socket: &Path,
) -> Result<Reply, ControlError> {
    loop {
        let line = lines.next_line().await.map_err(|source| ControlError::Io {
            path: socket.to_owned(),
            source,
        })?;
        let Some(line) = line else {
            return Err(ControlError::Io {
                path: socket.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "BIRD closed the connection mid-reply",
                ),
            });
        };
        if let Some(reply) = reader.push(&line)? {
            return Ok(reply);
        }
    }
}

/// A protocol as `show protocols` lists it (code 1002).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protocol {
    /// Its name in `bird.conf`.
    pub name: String,
    /// `BGP`, `Static`, `BFD`, `Device`...
    pub proto: String,
    /// BIRD's protocol state: `up`, `start`, `stop`, `down` or `flush`.
    pub state: String,
    /// When that state began, in BIRD's time format.
    pub since: String,
    /// The rest: for BGP, the session state and the last error.
    pub info: String,
}

/// The protocols of a `show protocols` reply.
pub fn parse_protocols(reply: &Reply) -> Vec<Protocol> {
    reply
        .lines
        .iter()
        .filter(|l| l.code == 1002)
        .filter_map(|l| {
            let mut words = l.text.split_whitespace();
            let name = words.next()?.to_owned();
            let proto = words.next()?.to_owned();
            let _table = words.next()?;
            let state = words.next()?.to_owned();
            let (since, rest) = since_and_rest(words.collect());
            Some(Protocol {
                name,
                proto,
                state,
                since,
                info: rest.join(" "),
            })
        })
        .collect()
}

/// A BFD session as `show bfd sessions` lists it (code 1020).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BfdSession {
    /// The neighbour.
    pub address: IpAddr,
    /// The interface, `---` for multihop.
    pub interface: String,
    /// `Up`, `Down`, `Init` or `AdminDown`.
    pub state: String,
    /// When that state began.
    pub since: String,
}

/// The sessions of a `show bfd sessions` reply: rows whose first word is an address
/// (the others are protocol names and headings).
pub fn parse_bfd_sessions(reply: &Reply) -> Vec<BfdSession> {
    reply
        .lines
        .iter()
        .filter(|l| l.code == 1020)
        .filter_map(|l| {
            let mut words = l.text.split_whitespace();
            let address: IpAddr = words.next()?.parse().ok()?;
            let interface = words.next()?.to_owned();
            let state = words.next()?.to_owned();
            let (since, _) = since_and_rest(words.collect());
            Some(BfdSession {
                address,
                interface,
                state,
                since,
            })
        })
        .collect()
}

/// Splits BIRD's time (`10:21:43.381`, `2024-01-01`, or `2024-01-01 10:21:43.381`
/// with a long time format) from the words after it.
fn since_and_rest(words: Vec<&str>) -> (String, Vec<&str>) {
    let looks_like_date = |w: &str| w.len() == 10 && w.as_bytes().get(4) == Some(&b'-');
    let looks_like_time =
        |w: &str| w.as_bytes().first().is_some_and(u8::is_ascii_digit) && w.contains(':');
    match *words.as_slice() {
        [date, time, ..] if looks_like_date(date) && looks_like_time(time) => {
            (format!("{date} {time}"), words[2..].to_vec())
        }
        [since, ..] => (since.to_owned(), words[1..].to_vec()),
        [] => (String::new(), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds raw lines; panics unless the last one ends the reply.
    fn reply(raw: &str) -> Reply {
        let mut reader = ReplyReader::default();
        let mut whole = None;
        for line in raw.lines() {
            assert!(whole.is_none(), "lines after the final one: {line:?}");
            whole = reader
                .push(line)
                .unwrap_or_else(|e| panic!("{line:?} refused: {e}"));
        }
        whole.unwrap_or_else(|| panic!("no final line in:\n{raw}"))
    }

    // As BIRD 2.0.12 writes `show protocols` on its socket: the heading, the first
    // row with its code, the others as continuations, then `0000 `.
    const PROTOCOLS: &str = "2002-Name       Proto      Table      State  Since         Info\n\
        1002-device1    Device     ---        up     10:21:43.381  \n \
        vips4      Static     master4    up     10:21:43.381  \n \
        bfd1       BFD        ---        up     10:21:43.381  \n \
        peer_10_0_0_254 BGP        ---        up     10:21:47.120  Established   \n \
        peer_10_0_0_253 BGP        ---        start  10:21:43.381  Active        Socket: Connection refused\n \
        peer_10_0_0_252 BGP        ---        down   2024-05-01    Error: Hold timer expired\n\
        0000 \n";

    #[test]
    fn reads_continuations_and_the_final_line() {
        let r = reply(PROTOCOLS);
        assert_eq!(r.code(), 0);
        assert!(!r.is_error());
        assert_eq!(r.lines.len(), 8);
        assert_eq!(r.lines[0].code, 2002);
        assert!(
            r.lines[2..7].iter().all(|l| l.code == 1002),
            "{:?}",
            r.lines
        );
    }

    #[test]
    fn greeting_and_errors() {
        let hello = reply("0001 BIRD 2.0.12 ready.\n");
        assert_eq!(hello.code(), 1);
        assert_eq!(hello.text(), "BIRD 2.0.12 ready.");
        let bad = reply(
            "0002-Reading configuration from /run/x/bird.conf\n\
             8002 /run/x/bird.conf:7:3 syntax error, unexpected CF_SYM_UNDEFINED\n",
        );
        assert!(bad.is_error());
        assert_eq!(bad.code(), 8002);
        assert!(bad.text().contains("syntax error"), "{}", bad.text());
        let ok = reply("0002-Reading configuration from /run/x/bird.conf\n0003 Reconfigured\n");
        assert_eq!(ok.code(), 3);
        assert!(!ok.is_error());
        assert!(reply("9001 syntax error, unexpected END\n").is_error());
        let mut reader = ReplyReader::default();
        assert!(
            reader
                .push("+Spontaneous message")
                .expect("skipped")
                .is_none()
        );
        assert!(reader.push("garbage").is_err());
    }

    #[test]
    fn parses_show_protocols() {
        let protocols = parse_protocols(&reply(PROTOCOLS));
        assert_eq!(protocols.len(), 6);
        let up = &protocols[3];
        assert_eq!(
            (up.name.as_str(), up.proto.as_str(), up.state.as_str()),
            ("peer_10_0_0_254", "BGP", "up")
        );
        assert_eq!(up.since, "10:21:47.120");
        assert_eq!(up.info, "Established");
        let active = &protocols[4];
        assert_eq!(active.state, "start");
        assert_eq!(active.info, "Active Socket: Connection refused");
        let down = &protocols[5];
        assert_eq!(
            (down.state.as_str(), down.since.as_str()),
            ("down", "2024-05-01")
        );
        assert_eq!(down.info, "Error: Hold timer expired");
    }

    #[test]
    fn parses_a_long_time_format() {
        let r = reply(
            "1002-peer_10_0_0_254 BGP        ---        up     2024-05-01 10:21:47  Established   \n\
             0000 \n",
        );
        let p = &parse_protocols(&r)[0];
        assert_eq!(p.since, "2024-05-01 10:21:47");
        assert_eq!(p.info, "Established");
    }

    #[test]
    fn parses_show_bfd_sessions() {
        let r = reply(
            "1020-bfd1:\n \
             IP address                Interface  State      Since         Interval  Timeout\n \
             10.0.0.254                lbc        Up         10:21:44.002    0.050    0.150\n \
             10.0.0.253                lbc        Down       10:21:43.381    1.000    0.000\n\
             0000 \n",
        );
        let sessions = parse_bfd_sessions(&r);
        assert_eq!(sessions.len(), 2, "{sessions:?}");
        assert_eq!(
            sessions[0].address,
            "10.0.0.254".parse::<IpAddr>().expect("an address")
        );
        assert_eq!(
            (sessions[0].interface.as_str(), sessions[0].state.as_str()),
            ("lbc", "Up")
        );
        assert_eq!(sessions[0].since, "10:21:44.002");
        assert_eq!(sessions[1].state, "Down");
        let none = reply("1020-bfd1: is not up\n0000 \n");
        assert!(parse_bfd_sessions(&none).is_empty());
    }
}
