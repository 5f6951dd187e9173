//! BIRD's control socket: the line protocol `birdc` speaks, and `show protocols` parsed into
//! the sessions `tenet node status` prints.
//!
//! A reply is a run of lines `DDDD-text` (more follows), ` text` (continues the previous code)
//! and ends with `DDDD text`. Codes below 1000 are results, 1000–7999 data, 8000+ errors.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::BgpError;
use super::bird::PeerType;

/// How long one reply may take (calicoctl gave BIRD 2 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One reply line: its code (that of the line it continues, for ` text` lines) and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    pub text: String,
}

/// A connection to a running BIRD.
pub struct BirdControl {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl BirdControl {
    /// Connects and reads BIRD's greeting (`0001 BIRD 2.0.12 ready.`).
    pub async fn connect(path: &Path) -> Result<Self, BgpError> {
        let io = |source| BgpError::Control {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, writer) = stream.into_split();
        let mut control = BirdControl {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
        };
        let greeting = control.read_reply().await?;
        if greeting.last().map(|l| l.code) != Some(1) {
            return Err(control.protocol_error(format!("unexpected greeting {greeting:?}")));
        }
        Ok(control)
    }

    /// Sends one command and returns its reply lines. A reply ending in an error code
    /// (8000 and above) is an error carrying BIRD's words.
    pub async fn request(&mut self, command: &str) -> Result<Vec<ReplyLine>, BgpError> {
        if command.contains('\n') {
            return Err(self.protocol_error("a command is one line".into()));
        }
        let line = format!("{command}\n");
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| BgpError::Control {
                path: self.path.clone(),
                source,
            })?;
        let reply = self.read_reply().await?;
        match reply.last() {
            Some(last) if last.code >= 8000 => Err(BgpError::Bird {
                command: command.to_string(),
                message: reply
                    .iter()
                    .map(|l| l.text.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
            _ => Ok(reply),
        }
    }

    /// `show protocols`, parsed.
    pub async fn protocols(&mut self) -> Result<Vec<BirdProtocol>, BgpError> {
        let reply = self.request("show protocols").await?;
        parse_protocols(&reply).map_err(|e| self.protocol_error(e))
    }

    /// `configure`: BIRD rereads its configuration file (already checked by the caller).
    /// Returns BIRD's result line (`Reconfigured`, `Reconfiguration in progress`, …).
    pub async fn configure(&mut self) -> Result<String, BgpError> {
        let reply = self.request("configure").await?;
        Ok(reply.last().map(|l| l.text.clone()).unwrap_or_default())
    }

    async fn read_reply(&mut self) -> Result<Vec<ReplyLine>, BgpError> {
        match tokio::time::timeout(REPLY_TIMEOUT, self.read_reply_inner()).await {
            Ok(r) => r,
            Err(_) => Err(self.protocol_error(format!(
                "no complete reply within {}s",
                REPLY_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn read_reply_inner(&mut self) -> Result<Vec<ReplyLine>, BgpError> {
        let mut lines = Vec::new();
        let mut code = 0;
        loop {
            let mut raw = String::new();
            let n = self
                .reader
                .read_line(&mut raw)
                .await
                .map_err(|source| BgpError::Control {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(self.protocol_error("BIRD closed the connection".into()));
            }
            let line = raw.trim_end_matches(['\r', '\n']);
            match parse_line(line) {
                Some((c, last, text)) => {
                    code = c;
                    lines.push(ReplyLine {
                        code,
                        text: text.to_string(),
                    });
                    if last {
                        return Ok(lines);
                    }
                }
                None => match line.strip_prefix(' ') {
                    Some(text) => lines.push(ReplyLine {
                        code,
                        text: text.to_string(),
                    }),
                    None => return Err(self.protocol_error(format!("unreadable line '{line}'"))),
                },
            }
        }
    }

    fn protocol_error(&self, message: String) -> BgpError {
        BgpError::ControlProtocol {
            path: self.path.clone(),
            message,
        }
    }
}

/// `DDDD-text` → (code, false, text); `DDDD text` → (code, true, text).
fn parse_line(line: &str) -> Option<(u16, bool, &str)> {
    let code = line.get(..4)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let last = match line.as_bytes().get(4) {
        Some(b'-') => false,
        Some(b' ') | None => true,
        _ => return None,
    };
    Some((code.parse().ok()?, last, line.get(5..).unwrap_or("")))
}

/// One row of `show protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BirdProtocol {
    pub name: String,
    pub proto: String,
    pub table: String,
    pub state: String,
    pub since: String,
    /// For BGP: the session state (`Established`, `Active`, …) and any detail after it.
    pub info: String,
}

impl BirdProtocol {
    /// The Calico peer this protocol is a session with, if it is one.
    pub fn peer(&self) -> Option<(PeerType, IpAddr)> {
        if self.proto != "BGP" {
            return None;
        }
        PeerType::parse_protocol(&self.name)
    }

    pub fn established(&self) -> bool {
        self.info.split_whitespace().next() == Some("Established")
    }
}

/// Reads the table: a 2002 heading `Name Proto Table State Since Info`, then 1002 rows.
pub fn parse_protocols(reply: &[ReplyLine]) -> Result<Vec<BirdProtocol>, String> {
    let mut rows = Vec::new();
    let mut heading = false;
    for line in reply {
        match line.code {
            2002 => {
                let words: Vec<String> = line
                    .text
                    .split_whitespace()
                    .map(str::to_lowercase)
                    .collect();
                if words != ["name", "proto", "table", "state", "since", "info"] {
                    return Err(format!("unexpected headings '{}'", line.text));
                }
                heading = true;
            }
            1002 => {
                if !heading {
                    return Err("protocol rows before the headings".into());
                }
                let mut words = line.text.split_whitespace();
                let mut next = || words.next().unwrap_or("").to_string();
                let (name, proto, table, state, since) = (next(), next(), next(), next(), next());
                let info = words.collect::<Vec<_>>().join(" ");
                if name.is_empty() {
                    return Err(format!("empty protocol row '{}'", line.text));
                }
                rows.push(BirdProtocol {
                    name,
                    proto,
                    table,
                    state,
                    since,
                    info,
                });
            }
            _ => {}
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Vec<ReplyLine> {
        let mut code = 0;
        text.lines()
            .map(|l| match parse_line(l) {
                Some((c, _, t)) => {
                    code = c;
                    ReplyLine {
                        code,
                        text: t.into(),
                    }
                }
                None => ReplyLine {
                    code,
                    text: l[1..].into(),
                },
            })
            .collect()
    }

    #[test]
    fn show_protocols_is_parsed_and_peers_recognised() {
        let r = reply(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-device1    Device     ---        up     2026-12-01T05:00:01  \n\
             \x20kernel4    Kernel     master4    up     2026-12-01T05:00:01  \n\
             \x20Mesh_10_0_0_2 BGP        ---        up     2026-12-01T05:00:03  Established   \n\
             \x20Global_10_0_0_254 BGP    ---        start  2026-12-01T05:00:01  Active        Socket: Connection refused\n\
             0000 ",
        );
        let rows = parse_protocols(&r).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].table, "master4");
        let mesh = &rows[2];
        assert_eq!(
            mesh.peer(),
            Some((PeerType::Mesh, "10.0.0.2".parse().unwrap()))
        );
        assert!(mesh.established());
        assert_eq!(rows[3].info, "Active Socket: Connection refused");
        assert!(!rows[3].established());
        assert_eq!(rows[0].peer(), None);
    }

    #[test]
    fn reply_lines_are_classified() {
        assert_eq!(
            parse_line("0001 BIRD 2.0.12 ready."),
            Some((1, true, "BIRD 2.0.12 ready."))
        );
        assert_eq!(parse_line("1002-device1"), Some((1002, false, "device1")));
        assert_eq!(parse_line("0000"), Some((0, true, "")));
        assert_eq!(parse_line(" continued"), None);
        assert_eq!(parse_line("12ab nope"), None);
    }

    #[test]
    fn wrong_headings_are_an_error() {
        let r = reply("2002-Name Proto\n0000 ");
        assert!(parse_protocols(&r).is_err());
    }
}
